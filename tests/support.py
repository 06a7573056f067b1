"""Helpers the tests share: paths, subprocesses, ports and waiting. Importable as `support` (pytest's
`pythonpath` puts tests/ on sys.path, and so do the environments below)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest

from tenfold.bench.common import free_port as free_port  # the one way to pick a port, shared with the benchmarks
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def process_gone(pid: int) -> bool:
    """Whether the process `pid` has exited (it may still wait to be reaped: its sockets are closed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


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


def serve_message(app: str, deployment: str, containing: str, timeout_s: float = 120) -> str:
    """Serve's status message for `deployment` of application `app`, once it contains `containing` (a replica
    that could not start, say why)."""
    from ray import serve

    def message() -> str | None:
        status = serve.status().applications.get(app)
        found = status.deployments.get(deployment) if status is not None else None
        return found.message if found is not None and containing in found.message else None

    return wait_for(message, timeout_s, f"Serve to say {containing!r} of {app}/{deployment}")


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at `path`, computed here rather than by the code under test."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mapped(pid: int, path: Path) -> bool:
    """Whether process `pid` maps the file at `path` (a model's weights are views into its archive's mapping)."""
    return str(path) in Path(f"/proc/{pid}/maps").read_text()


_SYSCALLS = {"x86_64": {"read": 0, "futex": 202}, "aarch64": {"read": 63, "futex": 98}}


def wait_blocked(call: str, *, fd: int | None = None, pid: int | None = None, main_thread: bool = False,
                 timeout_s: float = 10) -> None:
    """Wait until a thread of process `pid` (this one by default; only its main thread with `main_thread`) is
    blocked in the system call `call` (on `fd`, if given): in native code, where no interrupt reaches it.
    Linux's /proc/PID/task/TID/syscall names the call each thread is blocked in, and its first argument."""
    wanted = f"{_SYSCALLS[platform.machine()][call]} " + (f"{fd:#x} " if fd is not None else "")
    task = Path(f"/proc/{pid or 'self'}/task")
    pattern = f"{pid or os.getpid()}/syscall" if main_thread else "*/syscall"

    def blocked() -> bool:
        for path in task.glob(pattern):
            with contextlib.suppress(OSError):
                if path.read_text().startswith(wanted):
                    return True
        return False

    wait_for(blocked, timeout_s, f"a thread blocked in {call}" + (f" on fd {fd}" if fd is not None else ""),
             interval_s=0.01)


def wait_blocked_reading(fd: int, timeout_s: float = 10) -> None:
    """Wait until a thread of this process is blocked in read(2) on `fd`."""
    wait_blocked("read", fd=fd, timeout_s=timeout_s)


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


@contextlib.contextmanager
def serve_directory(directory: Path, handler: type | None = None) -> Iterator[str]:
    """The files of `directory` over HTTP on loopback (a stdlib server in a thread, `handler` a subclass of
    SimpleHTTPRequestHandler to serve more); yields its base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(handler or Quiet, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


#: Credentials the S3-compatible test server takes (it checks none); Ray's processes get them too.
TEST_AWS_ENV = {"AWS_ACCESS_KEY_ID": "tenfold-test", "AWS_SECRET_ACCESS_KEY": "tenfold-test-secret",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_server(bucket: str = "models") -> Iterator[Callable[[Path, str], str]]:
    """moto's S3-compatible server on loopback with `bucket`; yields upload(path, key) -> the s3:// URI, and
    sets AWS_ENDPOINT_URL_S3 for this process while it runs."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=TEST_AWS_ENV["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=TEST_AWS_ENV["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=bucket)

        def upload(path: Path, key: str) -> str:
            client.upload_file(str(path), bucket, key)
            return f"s3://{bucket}/{key}"

        upload.endpoint = endpoint  # type: ignore[attr-defined]
        yield upload
    finally:
        server.stop()


def plasma_usage() -> tuple[int, int]:
    """(MiB, objects) in the object stores of the Ray this process is connected to."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    assert found, text
    return int(found.group(1)), int(found.group(2))
