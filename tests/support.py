"""Helpers the tests share: paths, subprocesses, ports and waiting. Importable as `support` (pytest's
`pythonpath` puts tests/ on sys.path, and so do the environments below)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from tenfold.runtime import with_glibc_tunables

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

T = TypeVar("T")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child Python: tenfold and tests/ importable, static TLS reserved for
    interpreters, and no inherited RAY_ADDRESS (a child starts its own Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(TESTS), env.get("PYTHONPATH")) if p)
    return with_glibc_tunables({**env, **extra})


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` (dedented) in a fresh Python; its output and exit code."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.25) -> T:
    """The first true value of `predicate()`, polled every `interval_s`; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def stop_with_ctrl_c(proc: subprocess.Popen[Any], log: IO[str] | None = None, timeout_s: float = 90) -> int:
    """What Ctrl-C does; the exit code. A process that does not stop within `timeout_s` is killed with its
    process group, and fails the test."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        if log is not None:
            log.close()


def running_replicas(app: str, deployment: str) -> int:
    """Replicas of `deployment` in application `app` that Serve reports RUNNING."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))
