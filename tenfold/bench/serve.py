"""`tenfold bench serve`: interpreters vs processes vs threads behind Ray Serve, at the same CPU budget.

For each model, three set-ups get 2 CPUs from one local Ray:
  tenfold   1 replica x 2 namespace interpreters (this project)
  plain     2 replicas x 1 process: a plain Serve deployment that loads the archive with torch.package's own
            PackageImporter and runs the model in the replica's interpreter (what one does without tenfold)
  threads   1 replica x 2 interpreters of the threads backend (one GIL)
A bounded loopback HTTP client (a fixed number of requests outstanding) measures throughput and latency
in interleaved rounds (A B C, C B A, ...) with every set-up deployed, so that the drift of a shared machine
falls on all of them alike; the ratio is reported over all rounds and round by round. The replicas'
memory is their PSS (shared pages split between the processes that map them), taken with each set-up
deployed alone after a warm-up load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from . import common

SETUPS = ("tenfold", "plain", "threads")
_ONGOING = 16  # requests each set-up admits at once (the two plain replicas: 8 each), above the load's 8


class PlainModel:
    """The baseline: one model per process, loaded the plain torch.package way, run on one thread of the replica."""

    def __init__(self, archive: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch
        from torch.package import PackageImporter

        from tenfold.packaging import read_manifest

        torch.set_num_threads(1)  # one CPU per replica, as each interpreter gets
        from tenfold.integration import codec

        self._manifest = read_manifest(archive)
        self._interface = codec.Interface.of(self._manifest)
        package, _, resource = self._manifest.entry.rpartition("/")
        self._model = PackageImporter(archive).load_pickle(package, resource)
        if isinstance(self._model, torch.nn.Module):
            self._model.eval()
        self._executor = ThreadPoolExecutor(1)

    async def __call__(self, request: Any) -> Any:
        import asyncio

        body = await request.body()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._predict, body)

    def _predict(self, body: bytes) -> Any:
        import torch
        from starlette.responses import Response

        from tenfold.integration import codec

        with torch.no_grad():  # the same per-request work as a tenfold interpreter does
            answer = codec.predict_json(self._model, body, self._interface)
        return Response(answer, media_type=codec.JSON_TYPE)

    async def pid(self) -> int:
        return os.getpid()


def _load(url: str, body: bytes, seconds: float, warmup_s: float, concurrency: int) -> dict[str, Any]:
    """Bounded closed-loop load for `warmup_s + seconds`: latencies (s) of the requests sent after the
    warm-up, and the count of failed answers."""
    start = time.perf_counter()
    outcomes = common.closed_loop(url, [common.Body(common.JSON_TYPE, body)], concurrency=concurrency,
                                  seconds=warmup_s + seconds, timeout_s=120)
    measured = [o.seconds for o in outcomes if o.error is None and o.started >= start + warmup_s]
    return {"latencies": measured, "errors": sum(o.error is not None for o in outcomes), "seconds": seconds,
            "answered": len(outcomes)}


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput over all rounds (requests / seconds), latency percentiles over all requests, and the CPU
    time the replicas and Serve's HTTP proxy spent per request."""
    latencies = sorted(x for r in rounds for x in r["latencies"])
    seconds = sum(r["seconds"] for r in rounds)
    n = len(latencies)
    answered = sum(r["answered"] for r in rounds)
    cpu = {f"{part}_cpu_ms_per_request": 1000 * sum(r["cpu_s"][part] for r in rounds) / answered if answered else None
           for part in ("replicas", "proxy")}
    return {
        **cpu,
        "requests": n,
        "errors": sum(r["errors"] for r in rounds),
        "throughput_rps": n / seconds,
        "rounds_rps": [len(r["latencies"]) / r["seconds"] for r in rounds],
        "p50_ms": 1000 * latencies[n // 2] if n else None,
        "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))] if n else None,
        "mean_ms": 1000 * statistics.fmean(latencies) if n else None,
    }


def _replica_pids(get_pid: Any, replicas: int) -> set[int]:
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    while len(pids) < replicas and time.monotonic() < deadline:
        pids.add(get_pid())
    return pids


def _deploy(setup: str, archive: Path, port: int) -> set[int]:
    """Deploy one set-up (2 CPUs) as the application `setup` at /setup; its replicas' pids."""
    import requests
    from ray import serve

    from tenfold.integration import app_builder

    if setup == "plain":
        deployment = serve.deployment(PlainModel).options(
            name="plain", num_replicas=2, max_ongoing_requests=_ONGOING // 2, ray_actor_options={"num_cpus": 1}
        )
        handle = serve.run(deployment.bind(str(archive)), name=setup, route_prefix=f"/{setup}")
        return _replica_pids(lambda: handle.pid.remote().result(), 2)
    backend = "namespaces" if setup == "tenfold" else "threads"
    app = app_builder({"archive": str(archive), "interpreters": 2, "num_cpus": 2, "backend": backend,
                       "threads_per_interpreter": 1, "max_ongoing_requests": _ONGOING, "name": setup})
    serve.run(app, name=setup, route_prefix=f"/{setup}")
    url = f"http://127.0.0.1:{port}/{setup}"
    return _replica_pids(lambda: requests.get(f"{url}/-/stats", timeout=60).json()["pid"], 1)


def _measure_model(model: str, archive: Path, body: bytes, setups: list[str], args: argparse.Namespace,
                   port: int, progress: Any) -> list[dict[str, Any]]:
    """Memory of each set-up deployed alone (after a warm-up load), then throughput and latency in
    interleaved rounds with all set-ups deployed side by side, so that a slow minute of a shared machine
    falls on every set-up alike."""
    from ray import serve

    url = f"http://127.0.0.1:{port}/{{}}"
    memory, processes = {}, {}
    for setup in setups:
        pids = _deploy(setup, archive, port)
        _load(url.format(setup), body, args.warmup_s, 0.0, args.concurrency)
        memory[setup], processes[setup] = common.pss_bytes(pids) / 1e6, len(pids)
        serve.delete(setup)
        progress.update(1)
    deployed: dict[str, set[int]] = {}
    for setup in setups:
        deployed[setup] = _deploy(setup, archive, port)
        _load(url.format(setup), body, args.warmup_s, 0.0, args.concurrency)
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in setups}
    proxy = common.serve_proxy_pids()
    try:
        for r in range(args.rounds):
            for setup in setups if r % 2 == 0 else setups[::-1]:
                before = common.cpu_seconds(deployed[setup]), common.cpu_seconds(proxy)
                result = _load(url.format(setup), body, args.seconds, 0.5, args.concurrency)
                result["cpu_s"] = {"replicas": common.cpu_seconds(deployed[setup]) - before[0],
                                   "proxy": common.cpu_seconds(proxy) - before[1]}
                rounds[setup].append(result)
                progress.update(1)
    finally:
        for setup in setups:
            serve.delete(setup)
    return [{"model": model, "setup": s, **_summary(rounds[s]), "pss_mb": memory[s], "processes": processes[s]}
            for s in setups]


def run(args: argparse.Namespace) -> int:
    """`tenfold bench serve`."""
    from tqdm import tqdm

    models = [m for m in args.models.split(",") if m]
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        print(f"tenfold bench serve: unknown set-up(s) {unknown}; choose from {SETUPS}")
        return 2
    archives = {m: common.example_archive(m) for m in models}
    port = common.free_port()
    rows = []
    # Every set-up declares 2 CPUs; they sit side by side (so Ray is told of 2 per set-up) and take the
    # machine's cores in turns.
    with common.local_serve(2 * len(setups), port=port), \
            tqdm(total=len(models) * len(setups) * (1 + args.rounds), desc="bench serve", unit="step") as progress:
        for model, archive in archives.items():
            body = common.example_body(archive)
            for row in _measure_model(model, archive, body, setups, args, port, progress):
                rows.append(row)
                progress.write(f"{model:<14}{row['setup']:<9}{row['throughput_rps']:>9.1f} req/s  "
                               f"p50 {row['p50_ms']:>7.1f} ms  p99 {row['p99_ms']:>7.1f} ms  "
                               f"PSS {row['pss_mb']:>7.0f} MB  errors {row['errors']}")
    report = {"cpus_per_setup": 2, "seconds_per_round": args.seconds, "rounds": args.rounds,
              "concurrency": args.concurrency, "results": rows, "ratios": _ratios(rows)}
    _table(rows, report["ratios"])
    json_path, png_path = common.write_report(Path(args.out), "serve", report,
                                              lambda path: _plot(rows, report["ratios"], path))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def _ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    by = {(r["model"], r["setup"]): r for r in rows}
    ratios = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        t, p = by.get((model, "tenfold")), by.get((model, "plain"))
        if t and p and p["throughput_rps"]:
            per_round = [a / b for a, b in zip(t["rounds_rps"], p["rounds_rps"]) if b]
            ratios[model] = {"throughput_vs_plain": t["throughput_rps"] / p["throughput_rps"],
                             "throughput_vs_plain_by_round": per_round,
                             "pss_vs_plain": t["pss_mb"] / p["pss_mb"]}
    return ratios


def _table(rows: list[dict], ratios: dict) -> None:
    print("\n| model | set-up | req/s | p50 ms | p99 ms | PSS MB | replica CPU ms/req | proxy CPU ms/req | errors |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['setup']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['pss_mb']:.0f} | {r['replicas_cpu_ms_per_request']:.1f} | {r['proxy_cpu_ms_per_request']:.1f} | "
              f"{r['errors']} |")
    for model, q in ratios.items():
        rounds = ", ".join(f"{x:.2f}" for x in q["throughput_vs_plain_by_round"])
        print(f"{model}: tenfold/plain throughput {q['throughput_vs_plain']:.2f}x (by round: {rounds}), "
              f"memory {q['pss_vs_plain']:.2f}x")


def _plot(rows: list[dict], ratios: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    by = {(r["model"], r["setup"]): r for r in rows}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, key, title in zip(axes, ("throughput_rps", "p99_ms", "pss_mb"),
                              ("throughput (req/s)", "p99 latency (ms)", "replicas' PSS (MB)")):
        width = 0.8 / len(setups)
        for i, setup in enumerate(setups):
            values = [by[(m, setup)][key] if (m, setup) in by else 0 for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=setup)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_title(title)
    axes[0].legend()
    ax = axes[3]
    for j, model in enumerate(models):
        per_round = ratios.get(model, {}).get("throughput_vs_plain_by_round", [])
        ax.plot([j] * len(per_round), per_round, "o", alpha=0.6)
        if model in ratios:
            ax.plot([j - 0.2, j + 0.2], [ratios[model]["throughput_vs_plain"]] * 2, "k-", lw=2)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(models)), models)
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_title("tenfold / plain throughput\n(dots: rounds, bar: all rounds)")
    fig.suptitle("Ray Serve at 2 CPUs: 1 replica x 2 interpreters (tenfold) vs 2 replicas x 1 process (plain)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
