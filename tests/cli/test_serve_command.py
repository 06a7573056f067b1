"""`tenfold serve`: serves an archive, prints how to call it, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests
from support import free_port, run_python, stop_with_ctrl_c, subprocess_env

pytestmark = pytest.mark.ray


def test_tenfold_serve_serves_an_archive_prints_how_to_call_it_and_stops_on_ctrl_c(probe_archive: Path,
                                                                                 tmp_path: Path) -> None:
    port = free_port()
    archive = tmp_path / "probe.pt"
    archive.write_bytes(probe_archive.read_bytes())
    log_path = tmp_path / "tenfold-serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tenfold", "serve", str(archive), "--interpreters", "1",
                             "--port", str(port)], cwd=tmp_path, env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops serving" not in log_path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1.0)
        printed = log_path.read_text()
        assert proc.poll() is None, printed[-3000:]
        request_file = tmp_path / "probe.request.json"  # the body the printed curl command sends
        body = request_file.read_text()
        assert f"-d '{body}'" in printed and "(x: float32[?, 4], k: int64[?])" in printed
        r = requests.post(f"http://127.0.0.1:{port}/", data=body, headers={"Content-Type": "application/json"},
                          timeout=30)
        assert r.status_code == 200, r.text
        assert [len(o) for o in r.json()["outputs"]] == [1, 1]  # the printed request is one valid row
        prefix, snippet = printed.split(f"{sys.executable} - <<'PY'\n", 1)
        snippet = snippet.split("\n  PY\n", 1)[0]
        env = dict(kv.split("=", 1) for kv in prefix.rsplit("\n", 1)[-1].split())  # e.g. RAY_AUTH_MODE=token
        handle = run_python(textwrap.dedent(snippet), env=subprocess_env(**env), timeout=120)
        assert handle.returncode == 0, handle.stderr[-3000:]
        assert handle.stdout.strip().startswith("(tensor(") and "tensor([0])" in handle.stdout  # (y, 2 * k)
    finally:
        code = stop_with_ctrl_c(proc, log)
    assert code == 0, log_path.read_text()[-3000:]
    assert "stopping: draining replicas" in log_path.read_text()
