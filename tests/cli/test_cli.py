"""The `tenfold` command as a whole."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from support import subprocess_env


def test_version_prints_the_installed_version() -> None:
    out = subprocess.run([sys.executable, "-m", "tenfold", "--version"], capture_output=True, text=True,
                         env=subprocess_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tenfold {version('tenfold')}"
