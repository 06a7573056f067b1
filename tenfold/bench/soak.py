"""`tenfold bench soak`: a long, bounded loopback load on one replica; errors, latency and memory over time.

A fixed number of clients (each with one request outstanding: see `common.closed_loop`) send `requests`
calls in total, alternating JSON and Arrow bodies, and check every answer against a reference answer
taken before the run. Every `sample_every` completed requests the run records p50/p99 latency of that
window and the replica's resident memory (RSS, read from /proc: the replica runs on this machine).
A leak shows as growth per request, fitted (least squares) over the samples after the warm-up, of what the
interpreters hold between calls: the bytes their mallocs have in use and the blocks their Pythons have
allocated, both measured by each health check (`/-/stats`, run with a short health-check period). The host's
malloc and the process's RSS are fitted and bounded too, more loosely: the host is measured while requests
pass through it, and RSS also counts what the allocators keep free, so that a small leak first fills that
free memory and shows in RSS only later. No request may fail.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import common

#: Growth per request served after the warm-up that counts as a leak: of the bytes the interpreters' mallocs have
#: in use, and of the memory blocks their Pythons hold (a leaked object of any size is at least one).
MAX_HEAP_GROWTH_PER_REQUEST = 512
MAX_BLOCKS_PER_REQUEST = 0.5
#: The host's heap and RSS, looser: the host is measured with requests in flight, and RSS moves by MiBs with
#: allocator noise (a new arena, pages of shared libraries touched late).
MAX_HOST_HEAP_GROWTH_PER_REQUEST = 4096
MAX_RSS_GROWTH_PER_REQUEST = 4096

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
    heap_bytes: int = 0  # the interpreters' mallocs' bytes in use, at the replica's last health check
    python_blocks: int = 0  # the interpreters' Python memory blocks, then
    host_heap_bytes: int = 0  # the host's malloc's bytes in use, then


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

    def _after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.requests >= self.warmup_requests]

    @property
    def baseline_rss_bytes(self) -> int:
        """RSS at the first sample taken once the warm-up requests are done."""
        after = self._after_warmup()
        return after[0].rss_bytes if after else 0

    def _slope(self, figure: str) -> float:
        """Growth of `figure` per request: the least-squares slope over the samples after the warm-up."""
        import numpy as np

        after = self._after_warmup()
        if len(after) < 3:
            return 0.0
        n = np.array([s.requests for s in after], dtype=float)
        return float(np.polyfit(n, np.array([getattr(s, figure) for s in after], dtype=float), 1)[0])

    @property
    def growth_per_request(self) -> float:
        """Bytes of RSS gained per request after the warm-up (fitted)."""
        return self._slope("rss_bytes")

    @property
    def heap_growth_per_request(self) -> float:
        """Bytes the interpreters' mallocs gained in use per request after the warm-up (fitted)."""
        return self._slope("heap_bytes")

    @property
    def host_heap_growth_per_request(self) -> float:
        """Bytes the host's malloc gained in use per request after the warm-up (fitted)."""
        return self._slope("host_heap_bytes")

    @property
    def blocks_per_request(self) -> float:
        """Python memory blocks the interpreters gained per request after the warm-up (fitted)."""
        return self._slope("python_blocks")

    @property
    def verdicts(self) -> dict[str, bool]:
        """Each bar, and whether the run met it."""
        return {
            "no errors": self.errors == 0,
            f"heap < {MAX_HEAP_GROWTH_PER_REQUEST} B/request":
                self.heap_growth_per_request < MAX_HEAP_GROWTH_PER_REQUEST,
            f"Python blocks < {MAX_BLOCKS_PER_REQUEST}/request": self.blocks_per_request < MAX_BLOCKS_PER_REQUEST,
            f"host heap < {MAX_HOST_HEAP_GROWTH_PER_REQUEST} B/request":
                self.host_heap_growth_per_request < MAX_HOST_HEAP_GROWTH_PER_REQUEST,
            f"RSS < {MAX_RSS_GROWTH_PER_REQUEST} B/request": self.growth_per_request < MAX_RSS_GROWTH_PER_REQUEST,
        }

    @property
    def ok(self) -> bool:
        return all(self.verdicts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "samples"},
            "samples": [asdict(s) for s in self.samples],
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "growth_per_request_bytes": self.growth_per_request,
            "heap_growth_per_request_bytes": self.heap_growth_per_request,
            "python_blocks_per_request": self.blocks_per_request,
            "host_heap_growth_per_request_bytes": self.host_heap_growth_per_request,
            "verdicts": self.verdicts,
            "ok": self.ok,
        }

    def table(self) -> str:
        lines = [
            f"soak: {self.requests:,} requests to {self.url}, {self.concurrency} concurrent, "
            f"{self.duration_s:.1f} s ({self.requests / max(self.duration_s, 1e-9):,.0f} req/s)",
            f"{'requests':>10}{'elapsed s':>11}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'RSS MiB':>10}"
            f"{'heap MiB':>10}{'py blocks':>11}{'host MiB':>10}",
        ]
        lines += [_row(s) for s in self.samples]
        lines.append(
            f"errors {self.errors}; p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms; after the warm-up "
            f"({self.warmup_requests:,} requests), per request: interpreters' heap {self.heap_growth_per_request:+.0f} "
            f"bytes and Python blocks {self.blocks_per_request:+.3f}, host heap "
            f"{self.host_heap_growth_per_request:+.0f} bytes, RSS {self.growth_per_request:+.0f} bytes (from "
            f"{self.baseline_rss_bytes / 2**20:.1f} MiB): {'OK' if self.ok else 'FAILED'}"
        )
        lines += [f"  FAILED: {bar}" for bar, met in self.verdicts.items() if not met]
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
            f"{s.errors:>8}{s.rss_bytes / 2**20:>10.1f}{s.heap_bytes / 2**20:>10.2f}{s.python_blocks:>11,}"
            f"{s.host_heap_bytes / 2**20:>10.2f}")


def replica_pid(url: str) -> int:
    """The pid of the replica answering `url` (from its `GET /-/stats`)."""
    import requests

    r = requests.get(f"{url.rstrip('/')}/-/stats", timeout=30)
    r.raise_for_status()
    return int(r.json()["pid"])


def replica_memory(url: str) -> tuple[int, int, int]:
    """(interpreters' heap bytes in use, their Python blocks, the host's heap bytes) of the replica answering
    `url`, as its last health check measured them (`GET /-/stats`); zeros before its first."""
    import requests

    r = requests.get(f"{url.rstrip('/')}/-/stats", timeout=30)
    r.raise_for_status()
    memory = r.json().get("memory_in_use") or {}
    return (int(memory.get("interpreter_heap_bytes", 0)), int(memory.get("interpreter_python_blocks", 0)),
            int(memory.get("host", {}).get("heap_bytes", 0)))


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
    memory: Callable[[], tuple[int, int, int]] | None = None,
    warmup_requests: int | None = None,
    timeout_s: float = 60.0,
    on_sample: Callable[[Sample], Any] | None = None,
) -> SoakReport:
    """Send `requests` POSTs to `url` from `concurrency` clients, cycling `bodies`; sample every
    `sample_every` completed requests (`rss()` and `memory()`, as `replica_memory` gives it, are read then).
    The warm-up (default: the first window) ends before the fits begin. `on_sample` is called with each sample
    as it is taken (progress)."""
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
        heap, blocks, host_heap = memory() if memory is not None else (0, 0, 0)
        samples.append(Sample(
            requests=done, elapsed_s=now - t0, rss_bytes=rss(), heap_bytes=heap, python_blocks=blocks,
            host_heap_bytes=host_heap,
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
        # Health checks measure what the replica holds between calls: once a second, for many samples.
        app = app_builder({"archive": str(archive), "name": "soak", "interpreters": args.interpreters,
                           "health_check_period_s": 1.0})
        serve.run(app, name="soak", route_prefix="/soak")
        url = f"{base}/soak"
        pid = replica_pid(url)
        from tenfold.packaging import read_example_inputs, read_manifest

        inputs = [v[:1] for v in read_example_inputs(archive)]
        bodies = with_references(url, bodies_for(inputs, [s.name for s in read_manifest(archive).inputs]))
        print(f"soak: {args.requests:,} requests, {args.concurrency} clients, replica pid {pid}", flush=True)
        report = run_soak(url, bodies, requests=args.requests, concurrency=args.concurrency,
                          sample_every=args.sample_every, warmup_requests=args.warmup,
                          rss=lambda: common.rss_bytes(pid), memory=lambda: replica_memory(url),
                          on_sample=lambda s: print(_row(s), flush=True))
    print(report.table())
    json_path, png_path = common.write_report(args.out, "soak", report.as_dict(), report.plot)
    print(f"wrote {json_path} and {png_path}")
    return 0 if report.ok else 1
