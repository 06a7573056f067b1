"""`tenfold bench serve`: interpreters vs processes vs threads behind Ray Serve, at the same CPU budget.

For each model, three set-ups get 2 CPUs from one local Ray:
  tenfold   1 replica x 2 namespace interpreters (this project)
  plain     2 replicas x 1 process: a plain Serve deployment that loads the archive with torch.package's own
            PackageImporter and runs the model in the replica's interpreter (what one does without tenfold)
  threads   1 replica x 2 interpreters of the threads backend (one GIL)
A bounded loopback HTTP client (a fixed number of requests outstanding) measures throughput and latency;
the replicas' memory is their PSS (shared pages split between the processes that map them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

SETUPS = ("tenfold", "plain", "threads")


def add_commands(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("serve", help="HTTP throughput, latency and memory: 1x2 interpreters vs 2x1 processes")
    p.add_argument("--models", default="rnn_tagger,resnet", help="examples to serve (comma-separated)")
    p.add_argument("--setups", default=",".join(SETUPS), help="which of tenfold, plain, threads to run")
    p.add_argument("--seconds", type=float, default=20.0, help="measured load per set-up")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=8, help="requests outstanding at once")
    p.add_argument("--out", default="bench-results", help="directory for serve.json and serve.png")
    p.set_defaults(handler=run)


class PlainModel:
    """The baseline: one model per process, loaded the plain torch.package way, run on one thread of the replica."""

    def __init__(self, archive: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch
        from torch.package import PackageImporter

        from tenfold.packaging import read_manifest

        torch.set_num_threads(1)  # one CPU per replica, as each interpreter gets
        self._manifest = read_manifest(archive)
        package, _, resource = self._manifest.entry.rpartition("/")
        self._model = PackageImporter(archive).load_pickle(package, resource).eval()
        self._executor = ThreadPoolExecutor(1)

    async def __call__(self, request: Any) -> Any:
        import asyncio

        body = await request.body()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._predict, body)

    def _predict(self, body: bytes) -> Any:
        import torch
        from starlette.responses import Response

        from . import http
        inputs = [torch.from_numpy(a.copy()) for a in http.decode_json(body, self._manifest.inputs)]
        with torch.no_grad():
            result = self._model(*inputs)
        outputs = http.as_arrays(result, [o.name for o in self._manifest.outputs])
        return Response(http.encode_json(outputs), media_type=http.JSON_TYPE)

    async def pid(self) -> int:
        return os.getpid()


def _load(url: str, body: bytes, seconds: float, warmup_s: float, concurrency: int) -> dict[str, Any]:
    """Bounded closed-loop load: `concurrency` clients, one request outstanding each."""
    import requests

    stop_at = time.monotonic() + warmup_s + seconds
    measure_from = time.monotonic() + warmup_s
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        mine, bad = [], 0
        while True:
            t0 = time.monotonic()
            if t0 >= stop_at:
                break
            r = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=120)
            t1 = time.monotonic()
            if r.status_code != 200:
                bad += 1
            elif t0 >= measure_from:
                mine.append(t1 - t0)
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": errors[0],
        "throughput_rps": n / seconds,
        "p50_ms": 1000 * latencies[n // 2] if n else None,
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else None,
        "mean_ms": 1000 * statistics.fmean(latencies) if n else None,
    }


def _pss_mb(pids: set[int]) -> float:
    import psutil

    return sum(psutil.Process(p).memory_full_info().pss for p in pids) / 1e6


def _replica_pids(get_pid: Any, replicas: int) -> set[int]:
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    while len(pids) < replicas and time.monotonic() < deadline:
        pids.add(get_pid())
    return pids


def _run_setup(setup: str, model: str, archive: Path, body: bytes, args: argparse.Namespace, port: int) -> dict:
    import requests
    from ray import serve

    from .builder import app_builder

    url = f"http://127.0.0.1:{port}/{setup}"
    if setup == "plain":
        deployment = serve.deployment(PlainModel).options(
            name="plain", num_replicas=2, max_ongoing_requests=8, ray_actor_options={"num_cpus": 1}
        )
        handle = serve.run(deployment.bind(str(archive)), name=setup, route_prefix=f"/{setup}")
        pids = _replica_pids(lambda: handle.pid.remote().result(), 2)
    else:
        backend = "namespaces" if setup == "tenfold" else "threads"
        app = app_builder({"archive": str(archive), "interpreters": 2, "num_cpus": 2, "backend": backend,
                           "threads_per_interpreter": 1, "name": setup})
        serve.run(app, name=setup, route_prefix=f"/{setup}")
        pids = _replica_pids(lambda: requests.get(f"{url}/-/stats", timeout=60).json()["pid"], 1)
    try:
        result = _load(url, body, args.seconds, args.warmup_s, args.concurrency)
        result["pss_mb"] = _pss_mb(pids)
        result["processes"] = len(pids)
    finally:
        serve.delete(setup)
    return {"model": model, "setup": setup, **result}


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from ._cli import _archive_for, _example_request

    models = [m for m in args.models.split(",") if m]
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        print(f"tenfold bench serve: unknown set-up(s) {unknown}; choose from {SETUPS}")
        return 2
    archives = {m: _archive_for(m) for m in models}
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # the CPU budget of every set-up
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for model, (archive, example) in archives.items():
            request, _ = _example_request(archive, example)
            body = json.dumps(request).encode()
            for setup in setups:
                row = _run_setup(setup, model, archive, body, args, port)
                rows.append(row)
                print(f"{model:<14}{setup:<9}{row['throughput_rps']:>9.1f} req/s  p50 {row['p50_ms']:>7.1f} ms  "
                      f"p99 {row['p99_ms']:>7.1f} ms  PSS {row['pss_mb']:>7.0f} MB  errors {row['errors']}",
                      flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"cpus": 2, "seconds": args.seconds, "concurrency": args.concurrency, "results": rows,
              "ratios": _ratios(rows)}
    (out / "serve.json").write_text(json.dumps(report, indent=2))
    _table(rows, report["ratios"])
    _plot(rows, out / "serve.png")
    print(f"\nwrote {out / 'serve.json'} and {out / 'serve.png'}")
    return 0


def _ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    by = {(r["model"], r["setup"]): r for r in rows}
    ratios = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        t, p = by.get((model, "tenfold")), by.get((model, "plain"))
        if t and p and p["throughput_rps"]:
            ratios[model] = {"throughput_vs_plain": t["throughput_rps"] / p["throughput_rps"],
                             "pss_vs_plain": t["pss_mb"] / p["pss_mb"]}
    return ratios


def _table(rows: list[dict], ratios: dict) -> None:
    print("\n| model | set-up | req/s | p50 ms | p99 ms | PSS MB | errors |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['setup']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['pss_mb']:.0f} | {r['errors']} |")
    for model, q in ratios.items():
        print(f"{model}: tenfold/plain throughput {q['throughput_vs_plain']:.2f}x, memory {q['pss_vs_plain']:.2f}x")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    by = {(r["model"], r["setup"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("throughput_rps", "p99_ms", "pss_mb"),
                              ("throughput (req/s)", "p99 latency (ms)", "replicas' PSS (MB)")):
        width = 0.8 / len(setups)
        for i, setup in enumerate(setups):
            values = [by[(m, setup)][key] if (m, setup) in by else 0 for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=setup)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("Ray Serve at 2 CPUs: 1 replica x 2 interpreters (tenfold) vs 2 replicas x 1 process (plain)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
