"""`tenfold bench stream`: for a model that streams (examples.text_generator), the time to the first item
against the time to the whole answer, on tenfold's two HTTP routes and on plain Serve.

Set-ups, on one local Ray of 2 CPUs:
  tenfold-serve  1 tenfold replica x 2 interpreters, through Serve's HTTP proxy
  tenfold-port   the same replica through http_port (its interpreters serve HTTP themselves)
  plain          2 plain Serve replicas (weights memory-mapped), each answering with a StreamingResponse over
                 the same generator, through Serve's proxy

Every request asks for `--tokens` tokens. `--concurrency` clients each keep one request open, reading the
body as it arrives (http.client, one line per token); rounds of the set-ups are interleaved (A B C, C B A...).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import common

SETUPS = ("tenfold-serve", "tenfold-port", "plain")
CPUS = 2


class PlainStream:
    """A plain Serve replica: the archive loaded (weights memory-mapped), its generator streamed as
    newline-delimited JSON, one model per process."""

    def __init__(self, archive: str) -> None:
        import torch

        import tenfold.packaging as tp

        torch.set_num_threads(1)
        self.model = tp.load(archive)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        inputs = json.loads(await request.body())["inputs"]

        def lines() -> Any:
            import torch

            with torch.no_grad():
                for item in self.model(*inputs):
                    yield json.dumps(item).encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")


def _deploy(archive: Path, port: int) -> None:
    from ray import serve

    from tenfold.integration import app_builder

    serve.run(app_builder({"archive": str(archive), "interpreters": 2, "num_cpus": 0.5, "http_port": port,
                           "http_host": "127.0.0.1", "request_timeout_s": 60}),
              name="tenfold", route_prefix="/tenfold")
    plain = serve.deployment(PlainStream, name="plain", num_replicas=2, ray_actor_options={"num_cpus": 0.25},
                             max_ongoing_requests=8)
    serve.run(plain.bind(str(archive)), name="plain", route_prefix="/plain")


def _one(url: str, body: bytes) -> tuple[float, float, int]:
    """(seconds to the first item, seconds to the whole answer, items) of one streamed request."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("POST", parts.path or "/", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {response.read()[:300]!r}")
        first, items, pending = None, 0, b""
        while chunk := response.read1(65536):
            if first is None:
                first = time.perf_counter() - t0
            pending += chunk
            items += pending.count(b"\n")
            pending = pending[pending.rfind(b"\n") + 1:]
        return first or 0.0, time.perf_counter() - t0, items
    finally:
        conn.close()


def _load(url: str, body: bytes, requests: int, concurrency: int) -> list[tuple[float, float, int]]:
    """`requests` streamed requests from `concurrency` clients, one open at a time each."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    left = [requests]

    def client() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            r = _one(url, body)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _summary(samples: list[tuple[float, float, int]], tokens: int) -> dict[str, Any]:
    firsts = sorted(s[0] for s in samples)
    wholes = sorted(s[1] for s in samples)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000.0

    return {"requests": len(samples), "incomplete": sum(1 for s in samples if s[2] != tokens),
            "first_p50_ms": pct(firsts, 0.5), "first_p90_ms": pct(firsts, 0.9),
            "whole_p50_ms": pct(wholes, 0.5), "whole_p90_ms": pct(wholes, 0.9),
            "whole_over_first": statistics.median(wholes) / max(statistics.median(firsts), 1e-9)}


def table(report: dict[str, Any]) -> str:
    rows = [[s, r["requests"], r["incomplete"], f"{r['first_p50_ms']:.1f}", f"{r['first_p90_ms']:.1f}",
             f"{r['whole_p50_ms']:.1f}", f"{r['whole_p90_ms']:.1f}", f"{r['whole_over_first']:.0f}x"]
            for s, r in report["setups"].items()]
    return common.markdown_table(["set-up", "requests", "incomplete", "first item p50 ms", "p90", "whole p50 ms",
                                  "p90", "whole / first"], rows)


def run(args: argparse.Namespace) -> int:
    from ray import serve

    archive = common.example_archive(args.model, Path("build"))
    body = json.dumps({"inputs": ["Once upon a time", args.tokens]}).encode()
    port = common.free_port()
    samples: dict[str, list[tuple[float, float, int]]] = {s: [] for s in SETUPS}
    with common.local_serve(CPUS) as base:
        _deploy(archive, port)
        urls = {"tenfold-serve": f"{base}/tenfold", "tenfold-port": f"http://127.0.0.1:{port}/",
                "plain": f"{base}/plain"}
        for url in urls.values():  # warm: every replica and interpreter has run the model
            _load(url, body, 4 * args.concurrency, args.concurrency)
        for i in range(args.rounds):
            for setup in SETUPS if i % 2 == 0 else reversed(SETUPS):
                samples[setup] += _load(urls[setup], body, args.requests, args.concurrency)
                print(f"round {i + 1}/{args.rounds} {setup}: {len(samples[setup])} requests", flush=True)
        serve.delete("tenfold")
        serve.delete("plain")
    report = {"model": args.model, "tokens": args.tokens, "concurrency": args.concurrency, "rounds": args.rounds,
              "setups": {s: _summary(v, args.tokens) for s, v in samples.items()}}
    print(table(report))

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(report["setups"])
        firsts = [report["setups"][s]["first_p50_ms"] for s in names]
        wholes = [report["setups"][s]["whole_p50_ms"] for s in names]
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], wholes, height=0.4, label="whole answer (p50)")
        ax.barh([i - 0.2 for i in y], firsts, height=0.4, label="first item (p50)")
        ax.set_yticks(list(y), names)
        ax.set_xlabel(f"ms, {args.tokens} tokens, {args.concurrency} clients")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)

    json_path, png_path = common.write_report(args.out, "stream", report, plot)
    print(f"wrote {json_path} and {png_path}")
    return 1 if any(r["incomplete"] for r in report["setups"].values()) else 0
