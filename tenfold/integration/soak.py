"""`tenfold bench soak`: a long, bounded loopback load on one replica; errors, latency and RSS over time.

A fixed number of client threads (each with one request outstanding at most: the load is bounded, as
Ray Serve queues without limit otherwise) send `requests` calls in total, alternating JSON and Arrow
bodies, and check every answer against a reference answer taken before the run. Every `sample_every`
completed requests the run records p50/p99 latency of that window and the replica's resident memory
(RSS, read from /proc: the replica runs on this machine). After the warm-up, RSS must grow by less
than `MAX_RSS_GROWTH`; errors must be 0.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

MAX_RSS_GROWTH = 0.05  # the bar: < 5 % after warm-up


@dataclass(frozen=True)
class SoakRequest:
    """One request body the clients send over and over, with the answer it must get."""

    content_type: str
    body: bytes
    expected: bytes | None = None  # filled from a first call by `with_references`

    @property
    def kind(self) -> str:
        return "arrow" if "arrow" in self.content_type else "json"


@dataclass(frozen=True)
class Sample:
    """Figures of one window of `sample_every` requests, taken when the window completed."""

    requests: int
    elapsed_s: float
    rss_bytes: int
    p50_ms: float
    p99_ms: float
    errors: int
    requests_per_s: float


@dataclass
class SoakReport:
    """What a soak run measured; `ok` says whether it meets the issue's bar."""

    url: str
    requests: int
    concurrency: int
    sample_every: int
    warmup_requests: int
    duration_s: float
    errors: int
    p50_ms: float
    p99_ms: float
    samples: list[Sample] = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)

    @property
    def baseline_rss_bytes(self) -> int:
        """RSS at the first sample taken once the warm-up requests are done."""
        after = [s for s in self.samples if s.requests >= self.warmup_requests]
        return after[0].rss_bytes if after else 0

    @property
    def rss_growth(self) -> float:
        """(last RSS - RSS after warm-up) / RSS after warm-up."""
        base = self.baseline_rss_bytes
        return (self.samples[-1].rss_bytes - base) / base if base and self.samples else 0.0

    @property
    def max_rss_growth(self) -> float:
        """The largest RSS seen after warm-up, as growth over the warm-up RSS."""
        base = self.baseline_rss_bytes
        after = [s.rss_bytes for s in self.samples if s.requests >= self.warmup_requests]
        return (max(after) - base) / base if base and after else 0.0

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.rss_growth < MAX_RSS_GROWTH

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "samples"},
            "samples": [asdict(s) for s in self.samples],
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "rss_growth": self.rss_growth,
            "max_rss_growth": self.max_rss_growth,
            "ok": self.ok,
        }

    def table(self) -> str:
        lines = [
            f"soak: {self.requests:,} requests to {self.url}, {self.concurrency} concurrent, "
            f"{self.duration_s:.1f} s ({self.requests / max(self.duration_s, 1e-9):,.0f} req/s)",
            f"{'requests':>10}{'elapsed s':>11}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'RSS MiB':>10}",
        ]
        lines += [_row(s) for s in self.samples]
        lines.append(
            f"errors {self.errors}; p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms; RSS after warm-up "
            f"({self.warmup_requests:,} requests) {self.baseline_rss_bytes / 2**20:.1f} MiB, growth "
            f"{self.rss_growth:+.2%} at the end (max {self.max_rss_growth:+.2%}; bar < {MAX_RSS_GROWTH:.0%}): "
            f"{'OK' if self.ok else 'FAILED'}"
        )
        lines += [f"  error: {e}" for e in self.error_examples]
        return "\n".join(lines)

    def plot(self, path: Path) -> None:
        """p50/p99 latency and RSS against requests served, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = [s.requests for s in self.samples]
        fig, (lat, rss) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        lat.plot(n, [s.p50_ms for s in self.samples], marker="o", label="p50")
        lat.plot(n, [s.p99_ms for s in self.samples], marker="o", label="p99")
        lat.set_ylabel("latency per window (ms)")
        lat.legend()
        lat.set_title(f"soak: {self.requests:,} requests, {self.errors} errors, {self.concurrency} concurrent")
        rss.plot(n, [s.rss_bytes / 2**20 for s in self.samples], marker="o", color="tab:red")
        rss.axvline(self.warmup_requests, color="grey", linestyle=":", label="end of warm-up")
        rss.set_ylabel("replica RSS (MiB)")
        rss.set_xlabel("requests completed")
        rss.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _row(s: Sample) -> str:
    return (f"{s.requests:>10,}{s.elapsed_s:>11.1f}{s.requests_per_s:>9,.0f}{s.p50_ms:>9.2f}{s.p99_ms:>9.2f}"
            f"{s.errors:>8}{s.rss_bytes / 2**20:>10.1f}")


def process_rss(pid: int) -> int:
    """Resident set size of process `pid` on this machine, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def replica_pid(url: str) -> int:
    """The pid of the replica answering `url` (from its `GET /-/stats`)."""
    import requests

    r = requests.get(f"{url.rstrip('/')}/-/stats", timeout=30)
    r.raise_for_status()
    return int(r.json()["pid"])


def requests_for(inputs: Sequence[np.ndarray], names: Sequence[str]) -> list[SoakRequest]:
    """A JSON and an Arrow request body for the same `inputs` (the model's positional inputs)."""
    import numpy as np

    from . import http

    body = json.dumps({"inputs": [np.asarray(v).tolist() for v in inputs]}).encode()
    return [
        SoakRequest(http.JSON_TYPE, body),
        SoakRequest(http.ARROW_TYPE, http.encode_arrow_inputs([np.asarray(v) for v in inputs], names)),
    ]


def with_references(url: str, bodies: Sequence[SoakRequest]) -> list[SoakRequest]:
    """`bodies` with `expected` set to what the service answers them now (each must answer 200)."""
    import requests

    out = []
    for b in bodies:
        r = requests.post(url, data=b.body, headers={"Content-Type": b.content_type}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"the reference {b.kind} request answered {r.status_code}: {r.text[:300]}")
        out.append(SoakRequest(b.content_type, b.body, r.content))
    return out


def run_soak(
    url: str,
    bodies: Sequence[SoakRequest],
    *,
    requests: int,
    concurrency: int,
    sample_every: int,
    rss: Callable[[], int],
    warmup_requests: int | None = None,
    timeout_s: float = 60.0,
    on_sample: Callable[[Sample], Any] | None = None,
) -> SoakReport:
    """Send `requests` POSTs to `url` from `concurrency` threads (one outstanding each), cycling `bodies`.

    An error is any answer but a 200 whose body equals the body's `expected` (when set), or a failed
    connection. `rss()` is read every `sample_every` completed requests; the warm-up (default: the first
    window) ends the RSS baseline. `on_sample` is called with each sample as it is taken (progress).
    """
    import requests as http_client

    if requests < 1 or concurrency < 1 or sample_every < 1:
        raise ValueError("requests, concurrency and sample_every must be at least 1")
    if not bodies:
        raise ValueError("bodies must hold at least one request")
    warmup = sample_every if warmup_requests is None else warmup_requests
    lock = threading.Lock()
    next_index = 0
    stop = threading.Event()
    latencies: list[float] = []  # in completion order
    failed: list[bool] = []
    examples: list[str] = []
    samples: list[Sample] = []
    t0 = time.perf_counter()
    last_sample = [t0, 0]

    import numpy as np

    def take_sample(done: int) -> None:
        # Called with `lock` held by the thread whose request completed the window.
        window = np.array(latencies[done - sample_every:done]) * 1000.0
        now = time.perf_counter()
        rate = (done - last_sample[1]) / max(now - last_sample[0], 1e-9)
        last_sample[:] = [now, done]
        samples.append(Sample(
            requests=done, elapsed_s=now - t0, rss_bytes=rss(),
            p50_ms=float(np.percentile(window, 50)), p99_ms=float(np.percentile(window, 99)),
            errors=int(sum(failed[done - sample_every:done])), requests_per_s=rate,
        ))
        if on_sample is not None:
            on_sample(samples[-1])

    def worker() -> None:
        nonlocal next_index
        with http_client.Session() as session:
            while True:
                with lock:
                    i = next_index
                    if i >= requests or stop.is_set():
                        return
                    next_index += 1
                b = bodies[i % len(bodies)]
                error = None
                start = time.perf_counter()
                try:
                    r = session.post(url, data=b.body, headers={"Content-Type": b.content_type}, timeout=timeout_s)
                    if r.status_code != 200:
                        error = f"request {i} ({b.kind}): {r.status_code} {r.text[:200]}"
                    elif b.expected is not None and r.content != b.expected:
                        error = f"request {i} ({b.kind}): a 200 with a wrong answer {r.content[:200]!r}"
                except http_client.RequestException as exc:
                    error = f"request {i} ({b.kind}): {type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    failed.append(error is not None)
                    if error is not None and len(examples) < 5:
                        examples.append(error)
                    done = len(latencies)
                    if done % sample_every == 0:
                        take_sample(done)

    threads = [threading.Thread(target=worker, name=f"soak-client-{n}", daemon=True) for n in range(concurrency)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():  # a timed join, so that Ctrl-C reaches this thread
                t.join(0.5)
    except BaseException:
        stop.set()  # clients finish their current request and stop: nothing keeps loading the replica
        for t in threads:
            t.join(timeout_s)
        raise
    duration = time.perf_counter() - t0
    all_ms = np.array(latencies) * 1000.0
    return SoakReport(
        url=url, requests=requests, concurrency=concurrency, sample_every=sample_every, warmup_requests=warmup,
        duration_s=duration, errors=int(sum(failed)), p50_ms=float(np.percentile(all_ms, 50)),
        p99_ms=float(np.percentile(all_ms, 99)), samples=samples, error_examples=examples,
    )


def write_report(report: SoakReport, out: Path) -> tuple[Path, Path]:
    """soak.json and soak.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "soak.json", out / "soak.png"
    json_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    report.plot(png_path)
    return json_path, png_path


# -- the command ---------------------------------------------------------------------------------


def add_command(bench: argparse._SubParsersAction) -> None:
    """Registers `tenfold bench soak`."""
    p = bench.add_parser(
        "soak",
        help="100,000 requests (JSON and Arrow) to one replica: errors, p50/p99 and RSS over time",
        description="Deploys MODEL (an archive, or an example name) as one replica with --interpreters "
        "interpreters on a local Ray, sends --requests requests from --concurrency loopback clients and reports "
        "errors, latency per window and the replica's RSS every --sample-every requests (table, soak.json, "
        "soak.png). Exits 1 if any request failed or RSS grew by 5% or more after the warm-up.",
    )
    p.add_argument("model", nargs="?", default="rnn_tagger", help="archive path or an example name")
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=4, help="client threads, one request outstanding each")
    p.add_argument("--sample-every", type=int, default=10_000, help="requests per latency/RSS sample")
    p.add_argument("--warmup", type=int, default=None, help="requests before the RSS baseline (default: one sample)")
    p.add_argument("--interpreters", type=int, default=2)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    import numpy as np
    import ray
    from ray import serve

    from tenfold.packaging import read_manifest

    from ._cli import _archive_for, _example_request
    from .builder import app_builder

    archive, example = _archive_for(args.model)
    manifest = read_manifest(archive)
    request, dtypes = _example_request(archive, example)
    inputs = [np.asarray(v, dtype=d) for v, d in zip(request["inputs"], dtypes)]
    ray.init(num_cpus=max(2, args.interpreters), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = app_builder({"archive": str(archive), "name": "soak", "interpreters": args.interpreters})
        serve.run(app, name="soak", route_prefix="/soak")
        url = f"http://127.0.0.1:{args.port}/soak"
        pid = replica_pid(url)
        bodies = with_references(url, requests_for(inputs, [s.name for s in manifest.inputs]))
        print(f"soak: {args.requests:,} requests, {args.concurrency} clients, replica pid {pid}", flush=True)
        report = run_soak(url, bodies, requests=args.requests, concurrency=args.concurrency,
                          sample_every=args.sample_every, warmup_requests=args.warmup,
                          rss=lambda: process_rss(pid), on_sample=lambda s: print(_row(s), flush=True))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print(report.table())
    json_path, png_path = write_report(report, args.out)
    print(f"wrote {json_path} and {png_path}")
    return 0 if report.ok else 1
