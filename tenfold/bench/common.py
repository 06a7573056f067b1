"""What every benchmark shares: a local Ray Serve, example archives, a bounded closed-loop HTTP load,
process figures, and the report (a Markdown table, JSON and a PNG)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON_TYPE = "application/json"
ARROW_TYPE = "application/vnd.apache.arrow.stream"


# -- Ray ----------------------------------------------------------------------------------------


# Ray's processes bind ports all the time: its workers take 10002-19999, and its gRPC servers and agents take
# ports from the kernel's ephemeral range. A port picked from either range can be taken by one of them
# before the server it was picked for binds it, so ports are picked between the two.
_RAY_WORKER_PORTS_END = 20000
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now, and that neither Ray nor the kernel will hand
    to anything else meanwhile; never the same one twice in a process."""
    candidates = [p for p in range(_RAY_WORKER_PORTS_END, _ephemeral_start()) if p not in _handed_out]
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # no quiet range on this machine: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def local_serve(num_cpus: float, *, port: int | None = None) -> Iterator[str]:
    """A local Ray with Serve's HTTP proxy on loopback; yields its URL. Serve and Ray stop on exit."""
    import ray
    from ray import serve

    port = port or free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# -- example archives ---------------------------------------------------------------------------


def example_archive(name: str, build_dir: Path = Path("build")) -> Path:
    """The archive of `examples.<name>` under `build_dir`, packaged when missing or older than the module.

    `examples` is imported as a module from the current directory (the repository root), as `python -m`
    would find it; an existing path is returned as it is.
    """
    if Path(name).is_file():
        return Path(name)
    archive = build_dir / f"{name}.pt"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(f"examples.{name}")
    except ModuleNotFoundError as exc:
        raise SystemExit(f"no archive {name!r} and no module examples.{name} ({exc}); run from the repository "
                         "root or give an archive path") from None
    source = getattr(module, "__file__", None)
    if archive.is_file() and (source is None or os.path.getmtime(source) <= archive.stat().st_mtime):
        return archive
    from tenfold.packaging import save

    archive.parent.mkdir(parents=True, exist_ok=True)
    print(f"packaging examples.{name} -> {archive}", flush=True)
    save(module.build, archive, example_inputs=module.example_inputs(), dynamic=getattr(module, "DYNAMIC", None))
    return archive


def example_body(archive: Path) -> bytes:
    """A JSON request body for `archive`: the first row of the example inputs stored in it."""
    from tenfold.integration.codec import example_request

    return json.dumps(example_request(archive)).encode()


# -- load ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One request body the clients send, with the answer it must get (when known)."""

    content_type: str
    data: bytes
    expected: bytes | None = None

    @property
    def kind(self) -> str:
        return "arrow" if "arrow" in self.content_type else "json"


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (perf_counter), how long it took, and what went wrong if anything."""

    index: int
    kind: str
    started: float
    seconds: float
    error: str | None


def closed_loop(
    url: str,
    bodies: Sequence[Body],
    *,
    concurrency: int,
    requests: int | None = None,
    seconds: float | None = None,
    timeout_s: float = 60.0,
    on_outcome: Callable[[Outcome, int], Any] | None = None,
) -> list[Outcome]:
    """Bounded closed-loop load: `concurrency` clients, each with one request outstanding, cycling `bodies`,
    until `requests` were sent or `seconds` passed (whichever is given first). Ray Serve queues without
    limit, so the load is bounded by construction rather than by a rate.

    An error is any answer but a 200 with the body's `expected` content (when set), or a failed
    connection. `on_outcome(outcome, completed)` is called, under the load's lock, as each request
    completes. Ctrl-C stops the clients after their current request.
    """
    import requests as http_client

    if concurrency < 1 or (requests is None and seconds is None):
        raise ValueError("concurrency must be at least 1, and requests or seconds must bound the load")
    if not bodies:
        raise ValueError("bodies must hold at least one request")
    lock = threading.Lock()
    stop = threading.Event()
    outcomes: list[Outcome] = []
    issued = 0
    deadline = None if seconds is None else time.perf_counter() + seconds

    def client() -> None:
        nonlocal issued
        with http_client.Session() as session:
            while True:
                with lock:
                    index = issued
                    if stop.is_set() or (requests is not None and index >= requests):
                        return
                    if deadline is not None and time.perf_counter() >= deadline:
                        return
                    issued += 1
                body = bodies[index % len(bodies)]
                error = None
                start = time.perf_counter()
                try:
                    r = session.post(url, data=body.data, headers={"Content-Type": body.content_type},
                                     timeout=timeout_s)
                    if r.status_code != 200:
                        error = f"request {index} ({body.kind}): {r.status_code} {r.text[:200]}"
                    elif body.expected is not None and r.content != body.expected:
                        error = f"request {index} ({body.kind}): a 200 with a wrong answer {r.content[:200]!r}"
                except http_client.RequestException as exc:
                    error = f"request {index} ({body.kind}): {type(exc).__name__}: {exc}"
                outcome = Outcome(index, body.kind, start, time.perf_counter() - start, error)
                with lock:
                    outcomes.append(outcome)
                    if on_outcome is not None:
                        on_outcome(outcome, len(outcomes))

    threads = [threading.Thread(target=client, name=f"load-client-{n}", daemon=True) for n in range(concurrency)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():  # a timed join, so that Ctrl-C reaches this thread
                t.join(0.5)
    except BaseException:
        stop.set()
        for t in threads:
            t.join(timeout_s)
        raise
    return outcomes


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0-100, nearest rank) of `seconds`, in milliseconds."""
    if not seconds:
        return None
    ordered = sorted(seconds)
    return 1000.0 * ordered[min(len(ordered) - 1, int(len(ordered) * q / 100.0))]


# -- processes ----------------------------------------------------------------------------------


def cpu_seconds(pids: set[int]) -> float:
    """CPU seconds (user + system) the processes `pids` have used so far."""
    import psutil

    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` on this machine."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def serve_proxy_pids() -> set[int]:
    """Processes of Serve's HTTP proxy on this machine."""
    import psutil

    return {p.pid for p in psutil.process_iter(["cmdline"]) if "ProxyActor" in " ".join(p.info["cmdline"] or [])}


# -- reports ------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric_from: int = 1) -> str:
    """A Markdown table; columns from `numeric_from` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, name: str, data: dict[str, Any], plot: Callable[[Path], Any]) -> tuple[Path, Path]:
    """`out/name.json` (the data) and `out/name.png` (drawn by `plot(path)`); their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    plot(png_path)
    return json_path, png_path
