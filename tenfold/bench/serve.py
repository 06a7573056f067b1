"""`tenfold bench serve`: interpreters against processes behind Ray Serve, for cost and for speed.

Set-ups, each serving one example model from one local Ray:
  tenfold        1 replica x N namespace interpreters (this project)
  plain-mmap     N replicas x 1 process, weights memory-mapped from the archive file (`tenfold.packaging.load`:
                 the page cache holds one copy for all of them): the strongest plain set-up
  plain-private  N replicas x 1 process, loaded with torch.package's own PackageImporter (a copy each)
  threads        1 replica x N interpreters of the threads backend (one GIL)
  tenfold-batched  tenfold with max_batch_size 8: concurrent requests joined into one call (speed only; for
                 models that batch: tensor models with a batch dimension, list-to-list Python-valued ones)

Cost (each set-up deployed alone, for every N of --sizes): the machine-wide PSS delta (every process's
proportional set size, so that shared pages, the page cache's mapped pages and the object store count
once) from before the deploy to after a warm-up of 20 requests, with a breakdown per process; the
replica ready time (from `serve.run` to the first 200); the scale-up time (one more replica to serving).

Speed (N = 2, 2 CPUs per set-up, set-ups side by side): a bounded loopback HTTP client (a fixed number of
requests outstanding) in interleaved rounds (A B C, C B A, ...), so that the drift of a shared machine
falls on every set-up alike; throughput, p50/p99 and CPU per request, the ratio over all rounds and by round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from . import common

SETUPS = ("tenfold", "plain-mmap", "plain-private", "threads", "tenfold-batched")
BATCH = 8  # tenfold-batched's max_batch_size: the load's concurrency
SPEED_CPUS = 2
_ONGOING = 16  # requests each set-up admits at once (two plain replicas: 8 each), above the load's 8
_WARMUP_REQUESTS = 20


class PlainModel:
    """A plain Serve replica: one model per process, run on one thread of the replica, answering with the
    same per-request code as a tenfold interpreter."""

    def __init__(self, archive: str, weights: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from tenfold.integration import codec
        from tenfold.packaging import load, read_manifest

        torch.set_num_threads(1)  # one CPU per replica, as each interpreter gets
        self._interface = codec.Interface.of(read_manifest(archive))
        if weights == "mmap":
            self._model = load(archive)
        else:
            from torch.package import PackageImporter

            package, _, resource = read_manifest(archive).entry.rpartition("/")
            self._model = PackageImporter(archive).load_pickle(package, resource)
        self._executor = ThreadPoolExecutor(1)

    async def __call__(self, request: Any) -> Any:
        import asyncio

        body = await request.body()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._predict, body)

    def _predict(self, body: bytes) -> Any:
        import torch
        from starlette.responses import Response

        from tenfold.integration import codec

        with torch.no_grad():
            answer = codec.predict_json(self._model, body, self._interface)
        return Response(answer, media_type=codec.JSON_TYPE)

    async def pid(self) -> int:
        return os.getpid()


# -- deploying a set-up ---------------------------------------------------------------------------


def _application(setup: str, archive: Path, size: int, cpus: float, more: int = 0) -> Any:
    """The Serve application of `setup` with `size` workers (interpreters or processes) on `cpus` CPUs, and
    `more` replicas beside them (plain: processes of one worker; tenfold and threads: processes of `size`)."""
    from ray import serve

    from tenfold.integration import app_builder

    if setup.startswith("plain"):
        deployment = serve.deployment(PlainModel).options(
            name=setup, num_replicas=size + more, max_ongoing_requests=max(1, _ONGOING // size),
            ray_actor_options={"num_cpus": cpus / size},
        )
        return deployment.bind(str(archive), setup.removeprefix("plain-"))
    batching = {"max_batch_size": BATCH} if setup == "tenfold-batched" else {}
    return app_builder({"archive": str(archive), "interpreters": size, "num_cpus": cpus, "num_replicas": 1 + more,
                        "backend": "threads" if setup == "threads" else "namespaces", "threads_per_interpreter": 1,
                        "max_ongoing_requests": _ONGOING, "name": setup, **batching})


def _pids(url: str, processes: int, timeout_s: float = 120) -> set[int]:
    """The pids of the processes answering `url` (plain replicas answer `pid`, tenfold ones `/-/stats`)."""
    import requests

    found: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(found) < processes and time.monotonic() < deadline:
        r = requests.get(f"{url}/-/stats", timeout=60)
        if r.status_code == 200 and "pid" in r.json():
            found.add(r.json()["pid"])
    return found


def _plain_pids(setup: str, processes: int, timeout_s: float = 120) -> set[int]:
    from ray import serve

    handle = serve.get_deployment_handle(setup, setup)
    found: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(found) < processes and time.monotonic() < deadline:
        found.add(handle.pid.remote().result(timeout_s=60))
    return found


def _replica_pids(setup: str, url: str, processes: int) -> set[int]:
    return _plain_pids(setup, processes) if setup.startswith("plain") else _pids(url, processes)


def _first_200(url: str, body: bytes, timeout_s: float = 300) -> float:
    """When `url` first answers `body` with a 200 (perf_counter), polled every 20 ms."""
    import requests

    deadline = time.monotonic() + timeout_s
    with requests.Session() as session:
        while time.monotonic() < deadline:
            try:
                r = session.post(url, data=body, headers={"Content-Type": common.JSON_TYPE}, timeout=60)
                if r.status_code == 200:
                    return time.perf_counter()
            except requests.RequestException:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s} s")


def _run_timed(app: Any, setup: str, url: str, body: bytes) -> float:
    """Deploy `app` and return the seconds from the deploy to its first 200. `serve.run` waits for the whole
    application with coarse polling, so the first 200 is watched for from another thread meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    with ThreadPoolExecutor(1) as watcher:
        t0 = time.perf_counter()
        first = watcher.submit(_first_200, url, body)
        serve.run(app, name=setup, route_prefix=f"/{setup}")
        return first.result() - t0


def _wait_gone(pids: set[int], timeout_s: float = 60) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)


# -- cost -----------------------------------------------------------------------------------------


def _process_pss() -> dict[int, tuple[str, int]]:
    """pid -> (what the process is, PSS bytes) for every process of this machine that can be read."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            out[proc.pid] = (_role(proc.info["cmdline"] or [proc.info["name"] or "?"]), proc.memory_full_info().pss)
        except (psutil.Error, OSError):
            continue
    return out


def _role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    for marker in ("ServeReplica", "ServeController", "ProxyActor", "raylet", "gcs_server", "dashboard",
                   "log_monitor", "runtime_env", "plasma", "tenfold bench", "default_worker"):
        if marker in text:
            return text.split(" ", 1)[0].removeprefix("ray::") if marker == "ServeReplica" else marker
    return os.path.basename(cmdline[0]) if cmdline else "?"


def _breakdown(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, float]:
    """MB of PSS gained (or lost) per kind of process, largest first; kinds under 1 MB as "others"."""
    by: dict[str, float] = {}
    for pid in set(before) | set(after):
        role = (after.get(pid) or before[pid])[0]
        delta = (after.get(pid, (role, 0))[1] - before.get(pid, (role, 0))[1]) / 1e6
        by[role] = by.get(role, 0.0) + delta
    out = dict(sorted(((k, round(v, 1)) for k, v in by.items() if abs(v) >= 1.0), key=lambda kv: -abs(kv[1])))
    out["others"] = round(sum(v for v in by.values() if abs(v) < 1.0), 1)
    return out


def measure_cost(model: str, archive: Path, body: bytes, setup: str, size: int, url: str) -> dict[str, Any]:
    """One set-up deployed alone: memory it adds to the machine, ready time, scale-up time."""
    from ray import serve

    app = _application(setup, archive, size, cpus=SPEED_CPUS)
    time.sleep(1.0)
    before = _process_pss()
    ready_s = _run_timed(app, setup, url, body)
    common.closed_loop(url, [common.Body(common.JSON_TYPE, body)], concurrency=size, requests=_WARMUP_REQUESTS)
    time.sleep(1.0)
    after = _process_pss()
    processes = size if setup.startswith("plain") else 1
    pids = _replica_pids(setup, url, processes)
    # One more replica (tenfold: another process of N interpreters; plain: one more process).
    t0 = time.perf_counter()
    serve.run(_application(setup, archive, size, cpus=SPEED_CPUS, more=1), name=setup, route_prefix=f"/{setup}")
    grown = _replica_pids(setup, url, processes + 1)
    scale_up_s = time.perf_counter() - t0
    serve.delete(setup)
    _wait_gone(grown | pids)
    return {"model": model, "setup": setup, "size": size, "memory_mb": (sum(p for _, p in after.values()) -
            sum(p for _, p in before.values())) / 1e6, "ready_s": ready_s, "scale_up_s": scale_up_s,
            "processes": processes, "breakdown_mb": _breakdown(before, after)}


def _cost_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["model"], r["setup"], r["size"]): r for r in rows}
    out = []
    for (model, setup, size), r in by.items():
        if setup != "tenfold":
            continue
        entry: dict[str, Any] = {"model": model, "size": size}
        for peer in ("plain-mmap", "plain-private"):
            p = by.get((model, peer, size))
            if p:
                entry[f"memory_vs_{peer}"] = r["memory_mb"] / p["memory_mb"]
                entry[f"ready_vs_{peer}"] = r["ready_s"] / p["ready_s"]
        one = by.get((model, "plain-mmap", 1))
        if one:
            entry["ready_vs_one_plain_replica"] = r["ready_s"] / one["ready_s"]
        out.append(entry)
    return out


# -- speed ----------------------------------------------------------------------------------------


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
        "p50_ms": common.percentile_ms(latencies, 50),
        "p99_ms": common.percentile_ms(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies) if n else None,
    }


def measure_speed(model: str, archive: Path, body: bytes, setups: list[str], args: argparse.Namespace,
                  base_url: str, progress: Any) -> list[dict[str, Any]]:
    """Throughput and latency in interleaved rounds, every set-up deployed side by side at N = 2."""
    from ray import serve

    deployed: dict[str, set[int]] = {}
    for setup in setups:
        serve.run(_application(setup, archive, 2, cpus=SPEED_CPUS), name=setup, route_prefix=f"/{setup}")
        deployed[setup] = _replica_pids(setup, f"{base_url}/{setup}", 2 if setup.startswith("plain") else 1)
        _load(f"{base_url}/{setup}", body, args.warmup_s, 0.0, args.concurrency)
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in setups}
    proxy = common.serve_proxy_pids()
    try:
        for r in range(args.rounds):
            for setup in setups if r % 2 == 0 else setups[::-1]:
                before = common.cpu_seconds(deployed[setup]), common.cpu_seconds(proxy)
                result = _load(f"{base_url}/{setup}", body, args.seconds, 0.5, args.concurrency)
                result["cpu_s"] = {"replicas": common.cpu_seconds(deployed[setup]) - before[0],
                                   "proxy": common.cpu_seconds(proxy) - before[1]}
                rounds[setup].append(result)
                progress.update(1)
    finally:
        for setup in setups:
            serve.delete(setup)
    return [{"model": model, "setup": s, **_summary(rounds[s]), "processes": len(deployed[s])} for s in setups]


def _speed_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by = {(r["model"], r["setup"]): r for r in rows}
    ratios = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        t, p = by.get((model, "tenfold")), by.get((model, "plain-mmap"))
        if t and p and p["throughput_rps"]:
            per_round = [a / b for a, b in zip(t["rounds_rps"], p["rounds_rps"]) if b]
            ratios[model] = {"throughput_vs_plain": t["throughput_rps"] / p["throughput_rps"],
                             "throughput_vs_plain_by_round": per_round,
                             "p99_vs_plain": t["p99_ms"] / p["p99_ms"]}
        b = by.get((model, "tenfold-batched"))
        if t and b and t["throughput_rps"]:
            ratios.setdefault(model, {}).update({
                "batched_vs_tenfold": b["throughput_rps"] / t["throughput_rps"],
                "batched_vs_tenfold_by_round": [x / y for x, y in zip(b["rounds_rps"], t["rounds_rps"]) if y]})
    return ratios


# -- the run --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`tenfold bench serve`."""
    from tqdm import tqdm

    models = [m for m in args.models.split(",") if m]
    cost_models = [] if args.cost_models == "none" else [m for m in (args.cost_models or args.models).split(",") if m]
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        print(f"tenfold bench serve: unknown set-up(s) {unknown}; choose from {', '.join(SETUPS)}")
        return 2
    speed_setups = [s for s in setups if s != "plain-private"]
    cost_setups = [s for s in setups if s not in ("threads", "tenfold-batched")]
    archives = {m: common.example_archive(m) for m in dict.fromkeys(models + cost_models)}
    port = common.free_port()
    cost_rows: list[dict[str, Any]] = []
    speed_rows: list[dict[str, Any]] = []
    steps = len(cost_models) * (len(cost_setups) * len(args.sizes) + 1) + len(models) * len(speed_setups) * args.rounds
    # Every set-up declares 2 CPUs; they sit side by side (so Ray is told of 2 per set-up) and take the
    # machine's cores in turns.
    with common.local_serve(SPEED_CPUS * max(len(speed_setups), 1), port=port) as base_url, \
            tqdm(total=steps, desc="bench serve", unit="step") as progress:
        for model in cost_models:
            body = common.example_body(archives[model])
            # One plain replica first: the ready time every set-up is held to.
            runs = [("plain-mmap", 1)] if "plain-mmap" in cost_setups else []
            runs += [(setup, size) for size in args.sizes for setup in cost_setups]
            for setup, size in runs:
                row = measure_cost(model, archives[model], body, setup, size, f"{base_url}/{setup}")
                cost_rows.append(row)
                progress.update(1)
                progress.write(f"{model:<16}{setup:<14}N={size}  +{row['memory_mb']:>7.0f} MB  ready "
                               f"{row['ready_s']:5.1f} s  scale-up {row['scale_up_s']:5.1f} s")
        for model in models if args.rounds else []:
            body = common.example_body(archives[model])
            for row in measure_speed(model, archives[model], body, speed_setups, args, base_url, progress):
                speed_rows.append(row)
                progress.write(f"{model:<16}{row['setup']:<14}{row['throughput_rps']:>9.1f} req/s  p50 "
                               f"{row['p50_ms']:>7.1f} ms  p99 {row['p99_ms']:>7.1f} ms  errors {row['errors']}")
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "cost": {"sizes": args.sizes, "results": cost_rows, "ratios": _cost_ratios(cost_rows)},
        "speed": {"cpus_per_setup": SPEED_CPUS, "seconds_per_round": args.seconds, "rounds": args.rounds,
                  "concurrency": args.concurrency, "results": speed_rows, "ratios": _speed_ratios(speed_rows)},
    }
    print(tables(report))
    json_path, png_path = common.write_report(Path(args.out), "serve", report, lambda path: _plot(report, path))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def tables(report: dict[str, Any]) -> str:
    """The report as Markdown tables: cost, then speed."""
    lines = []
    cost = report["cost"]["results"]
    if cost:
        ratios = {(r["model"], r["size"]): r for r in report["cost"]["ratios"]}
        rows = [[r["model"], r["setup"], r["size"], f"{r['memory_mb']:.0f}", f"{r['ready_s']:.1f}",
                 f"{r['scale_up_s']:.1f}", _ratio_cell(ratios.get((r["model"], r["size"]), {}), r["setup"])]
                for r in cost]
        lines += ["", common.markdown_table(["model", "set-up", "N", "memory MB", "ready s", "scale-up s",
                                             "tenfold vs it (memory, ready)"], rows, numeric_from=2)]
        for q in report["cost"]["ratios"]:
            parts = [f"{q[f'memory_vs_{peer}']:.2f}x the memory of {peer}" for peer in ("plain-mmap", "plain-private")
                     if f"memory_vs_{peer}" in q]
            if "ready_vs_one_plain_replica" in q:
                parts.append(f"{q['ready_vs_one_plain_replica']:.2f}x the ready time of one plain replica")
            lines.append(f"{q['model']}, N={q['size']}: tenfold takes " + "; ".join(parts))
    speed = report["speed"]["results"]
    if speed:
        rows = [[r["model"], r["setup"], f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                 f"{r['replicas_cpu_ms_per_request']:.1f}", f"{r['proxy_cpu_ms_per_request']:.1f}", r["errors"]]
                for r in speed]
        lines += ["", common.markdown_table(["model", "set-up (2 CPUs)", "req/s", "p50 ms", "p99 ms",
                                             "replica CPU ms/req", "proxy CPU ms/req", "errors"], rows, numeric_from=2)]
        for model, q in report["speed"]["ratios"].items():
            if "throughput_vs_plain" in q:
                by_round = ", ".join(f"{x:.2f}" for x in q["throughput_vs_plain_by_round"])
                lines.append(f"{model}: tenfold/plain-mmap throughput {q['throughput_vs_plain']:.2f}x (by round: "
                             f"{by_round}), p99 {q['p99_vs_plain']:.2f}x")
            if "batched_vs_tenfold" in q:
                by_round = ", ".join(f"{x:.2f}" for x in q["batched_vs_tenfold_by_round"])
                lines.append(f"{model}: tenfold with max_batch_size {BATCH} / without: throughput "
                             f"{q['batched_vs_tenfold']:.2f}x (by round: {by_round})")
    return "\n".join(lines)


def _ratio_cell(ratios: dict[str, Any], setup: str) -> str:
    if setup == "tenfold" or f"memory_vs_{setup}" not in ratios:
        return ""
    return f"{ratios[f'memory_vs_{setup}']:.2f}x, {ratios[f'ready_vs_{setup}']:.2f}x"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    cost, speed = report["cost"]["results"], report["speed"]["results"]
    fig, axes = plt.subplots(1, 3, figsize=(20, 5.5), gridspec_kw={"width_ratios": [2, 2, 1]})
    groups = list(dict.fromkeys((r["model"], r["size"]) for r in cost))
    setups = list(dict.fromkeys(r["setup"] for r in cost))
    by = {(r["model"], r["size"], r["setup"]): r for r in cost}
    width = 0.8 / max(len(setups), 1)
    for ax, key, title in ((axes[0], "memory_mb", "memory added to the machine (MB, PSS)"),
                           (axes[1], "ready_s", "replica ready: serve.run to first 200 (s)")):
        for i, setup in enumerate(setups):
            values = [by[(m, n, setup)][key] if (m, n, setup) in by else 0 for m, n in groups]
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=setup)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{m} N={n}" for m, n in groups],
                      fontsize=8, rotation=35, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=8)
    ax = axes[2]
    models = list(dict.fromkeys(r["model"] for r in speed))
    for j, model in enumerate(models):
        q = report["speed"]["ratios"].get(model, {})
        for key, marker, label in (("throughput_vs_plain", "o", "tenfold / plain-mmap"),
                                   ("batched_vs_tenfold", "s", f"max_batch_size {BATCH} / none")):
            if key in q:
                per_round = q[f"{key}_by_round"]
                ax.plot([j] * len(per_round), per_round, marker, alpha=0.6, label=label if j == 0 else None)
                ax.plot([j - 0.2, j + 0.2], [q[key]] * 2, "k-", lw=2)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(models)), models, fontsize=8)
    ax.set_xlim(-0.5, max(len(models), 1) - 0.5)
    ax.legend(fontsize=8)
    ax.set_title("throughput ratios at 2 CPUs\n(dots: rounds, bar: all rounds)")
    fig.suptitle(f"tenfold bench serve, {report['when']}: 1 replica x N interpreters vs N plain replicas")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
