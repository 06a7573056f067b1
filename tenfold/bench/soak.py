"""`tenfold bench soak`: a long, bounded loopback load on one replica; errors, latency and memory over time.

A fixed number of clients (each with one request outstanding: see `common.closed_loop`) send `requests`
calls in total, alternating JSON and Arrow bodies, and check every answer against a reference answer
taken before the run. Every `sample_every` completed requests the run records p50/p99 latency of that
window and the replica's resident memory (RSS, read from /proc: the replica runs on this machine).
A leak shows as growth per request: after the warm-up, RSS must grow by less than
`MAX_GROWTH_PER_REQUEST` bytes per request served, and no request may fail.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import common

#: Bytes of RSS growth per request served after the warm-up that count as a leak. A call keeping its
#: arguments or result alive costs several KiB; allocator noise over 10,000 requests stays far below.
MAX_GROWTH_PER_REQUEST = 1024

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
    def growth_per_request(self) -> float:
        """Bytes of RSS gained per request between the end of the warm-up and the last sample."""
        after = [s for s in self.samples if s.requests >= self.warmup_requests]
        if len(after) < 2:
            return 0.0
        return (after[-1].rss_bytes - after[0].rss_bytes) / (after[-1].requests - after[0].requests)

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.growth_per_request < MAX_GROWTH_PER_REQUEST

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "samples"},
            "samples": [asdict(s) for s in self.samples],
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "growth_per_request_bytes": self.growth_per_request,
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
            f"({self.warmup_requests:,} requests) {self.baseline_rss_bytes / 2**20:.1f} MiB, then "
            f"{self.growth_per_request:+.0f} bytes per request (bar < {MAX_GROWTH_PER_REQUEST}): "
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


def replica_pid(url: str) -> int:
    """The pid of the replica answering `url` (from its `GET /-/stats`)."""
    import requests

    r = requests.get(f"{url.rstrip('/')}/-/stats", timeout=30)
    r.raise_for_status()
    return int(r.json()["pid"])


def bodies_for(inputs: Sequence[Any], names: Sequence[str]) -> list[common.Body]:
    """A JSON and an Arrow request body for the same `inputs` (the model's positional inputs, arrays)."""
    import json

    import numpy as np

    from tenfold.integration import codec

    arrays = [np.asarray(v) for v in inputs]
    return [
        common.Body(codec.JSON_TYPE, json.dumps({"inputs": [a.tolist() for a in arrays]}).encode()),
        common.Body(codec.ARROW_TYPE, codec.encode_arrow_inputs(arrays, names)),
    ]


def with_references(url: str, bodies: Sequence[common.Body]) -> list[common.Body]:
    """`bodies` with `expected` set to what the service answers them now (each must answer 200)."""
    import requests

    out = []
    for b in bodies:
        r = requests.post(url, data=b.data, headers={"Content-Type": b.content_type}, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"the reference {b.kind} request answered {r.status_code}: {r.text[:300]}")
        out.append(common.Body(b.content_type, b.data, r.content))
    return out


def run_soak(
    url: str,
    bodies: Sequence[common.Body],
    *,
    requests: int,
    concurrency: int,
    sample_every: int,
    rss: Callable[[], int],
    warmup_requests: int | None = None,
    timeout_s: float = 60.0,
    on_sample: Callable[[Sample], Any] | None = None,
) -> SoakReport:
    """Send `requests` POSTs to `url` from `concurrency` clients, cycling `bodies`; sample every
    `sample_every` completed requests (`rss()` is read then). The warm-up (default: the first window)
    ends the RSS baseline. `on_sample` is called with each sample as it is taken (progress)."""
    import time

    import numpy as np

    if requests < 1 or concurrency < 1 or sample_every < 1:
        raise ValueError("requests, concurrency and sample_every must be at least 1")
    warmup = sample_every if warmup_requests is None else warmup_requests
    samples: list[Sample] = []
    window: list[common.Outcome] = []
    t0 = time.perf_counter()
    last = [t0, 0]

    def sample(outcome: common.Outcome, done: int) -> None:
        window.append(outcome)
        if done % sample_every:
            return
        ms = np.array([o.seconds for o in window]) * 1000.0
        now = time.perf_counter()
        samples.append(Sample(
            requests=done, elapsed_s=now - t0, rss_bytes=rss(),
            p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
            errors=sum(o.error is not None for o in window), requests_per_s=(done - last[1]) / max(now - last[0], 1e-9),
        ))
        last[:] = [now, done]
        window.clear()
        if on_sample is not None:
            on_sample(samples[-1])

    outcomes = common.closed_loop(url, bodies, concurrency=concurrency, requests=requests, timeout_s=timeout_s,
                                  on_outcome=sample)
    all_ms = np.array([o.seconds for o in outcomes]) * 1000.0
    errors = [o.error for o in outcomes if o.error is not None]
    return SoakReport(
        url=url, requests=requests, concurrency=concurrency, sample_every=sample_every, warmup_requests=warmup,
        duration_s=time.perf_counter() - t0, errors=len(errors), p50_ms=float(np.percentile(all_ms, 50)),
        p99_ms=float(np.percentile(all_ms, 99)), samples=samples, error_examples=errors[:5],
    )


def run(args: argparse.Namespace) -> int:
    """`tenfold bench soak`."""
    from ray import serve

    from tenfold.integration import app_builder

    archive = common.example_archive(args.model)
    with common.local_serve(max(2, args.interpreters), port=args.port) as base:
        app = app_builder({"archive": str(archive), "name": "soak", "interpreters": args.interpreters})
        serve.run(app, name="soak", route_prefix="/soak")
        url = f"{base}/soak"
        pid = replica_pid(url)
        from tenfold.packaging import read_example_inputs, read_manifest

        inputs = [v[:1] for v in read_example_inputs(archive)]
        bodies = with_references(url, bodies_for(inputs, [s.name for s in read_manifest(archive).inputs]))
        print(f"soak: {args.requests:,} requests, {args.concurrency} clients, replica pid {pid}", flush=True)
        report = run_soak(url, bodies, requests=args.requests, concurrency=args.concurrency,
                          sample_every=args.sample_every, warmup_requests=args.warmup,
                          rss=lambda: common.rss_bytes(pid), on_sample=lambda s: print(_row(s), flush=True))
    print(report.table())
    json_path, png_path = common.write_report(args.out, "soak", report.as_dict(), report.plot)
    print(f"wrote {json_path} and {png_path}")
    return 0 if report.ok else 1
