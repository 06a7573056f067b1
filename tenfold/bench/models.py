"""`tenfold bench models`: several models per replica. Two figures, each against plain Serve:

memory   4 archives served at once, every model loaded (one request to each), measured as the proportional set
         size (PSS) of the replicas' processes: shared pages, as an archive mapped by several processes, count
         once in all. One setup runs at a time, so that no page is shared with another.
           tenfold, 1 app     one application of the 4 archives (`archives:`): 1 replica x 2 interpreters
           tenfold, 4 apps    4 applications of one archive each: 4 replicas x 2 interpreters
           plain, 1 app       one plain Serve deployment that holds the 4 models (weights memory-mapped from the
                              archives, tenfold.packaging.load): 2 replicas, for the same 2 cores
           plain, 4 apps      4 plain Serve applications of one model each: 2 replicas each
first    the latency of a request to a model the replica does not hold, against one to a model it holds, with
         `max_models_per_replica: 1` (each model asked for in turn unloads the last: every first request loads):
           tenfold            1 replica x 2 interpreters, on Serve's route and on http_port
           plain              a plain Serve deployment with @serve.multiplexed(max_num_models_per_replica=1)
                              that loads the archive (memory-mapped) on a model's first request: 1 replica
Requests name the model with Serve's multiplexing header on every set-up, so that its router sends them to the
replica holding the model. The rounds of the first-request figure interleave the set-ups.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import common

MODELS = ("minilm_embedder", "semantic_search", "resnet", "text_encoder")
CPUS = 8  # logical: the 4-application set-ups reserve 2 CPUs of Ray's per model; memory is what is measured
_HEADER = "serve_multiplexed_model_id"


class PlainModels:
    """Plain Serve replicas of several models: one process, the model picked by Serve's multiplexing header, run
    on one thread with the same per-request code as a tenfold interpreter. `preload`: every model loaded at start;
    else each on its first request, at most one at a time (Serve's multiplexing unloads the other)."""

    def __init__(self, archives: dict[str, str], preload: bool) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch
        from ray import serve

        torch.set_num_threads(1)  # one CPU per replica, as each interpreter gets
        self._archives = archives
        self._executor = ThreadPoolExecutor(1)
        self._models = {name: self._load(name) for name in archives} if preload else {}

        async def load(name: str) -> Any:
            import asyncio

            return await asyncio.get_running_loop().run_in_executor(self._executor, self._load, name)

        self._multiplexed = serve.multiplexed(max_num_models_per_replica=1)(load)

    def _load(self, name: str) -> tuple[Any, Any]:
        from tenfold.integration import codec
        from tenfold.packaging import load, read_manifest

        return load(self._archives[name]), codec.Interface.of(read_manifest(self._archives[name]))

    async def __call__(self, request: Any) -> Any:
        import asyncio

        from ray import serve

        name = serve.get_multiplexed_model_id()
        model = self._models.get(name) or await self._multiplexed(name)
        body = await request.body()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._predict, model, body)

    def _predict(self, model: tuple[Any, Any], body: bytes) -> Any:
        import torch
        from starlette.responses import Response

        from tenfold.integration import codec

        with torch.no_grad():
            return Response(codec.predict_json(model[0], body, model[1]), media_type=codec.JSON_TYPE)

    async def pid(self) -> int:
        return os.getpid()


def _post(url: str, body: bytes, model: str, timeout_s: float = 300) -> float:
    """Seconds to the answer of one request to `model` at `url` (raises on any status but 200)."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", _HEADER: model})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as r:
        r.read()
    return time.perf_counter() - t0


def _wait(url: str, body: bytes, model: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _post(url, body, model)
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _replica_pids(app: str) -> set[int]:
    """The pids of application `app`'s replicas (Ray titles each process ray::ServeReplica:APP:DEPLOYMENT...)."""
    import psutil

    title = f"ServeReplica:{app}:"
    return {p.pid for p in psutil.process_iter(["cmdline"]) if any(title in part for part in p.info["cmdline"] or [])}


def _pss_mb(pids: set[int]) -> float:
    import psutil

    return sum(psutil.Process(pid).memory_full_info().pss for pid in pids) / 2**20


def _tenfold(name: str, archives: dict[str, Path], **args: Any) -> Any:
    from tenfold.integration import app_builder

    base = {"interpreters": 2, "num_cpus": 0.5, "request_timeout_s": 120, "health_check_period_s": 1.0, **args}
    if len(archives) == 1:
        (archive,) = archives.values()
        return app_builder({**base, "archive": str(archive), "name": name})
    return app_builder({**base, "archives": {n: str(p) for n, p in archives.items()}, "name": name})


def _plain(name: str, archives: dict[str, Path], *, replicas: int, preload: bool) -> Any:
    from ray import serve

    from tenfold.runtime import GLIBC_TUNABLES

    deployment = serve.deployment(PlainModels).options(
        name=name, num_replicas=replicas, max_ongoing_requests=16,
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"GLIBC_TUNABLES": GLIBC_TUNABLES}}})
    return deployment.bind({n: str(p) for n, p in archives.items()}, preload)


def _memory(base: str, archives: dict[str, Path], bodies: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Each set-up alone, every model loaded: its replicas' PSS."""
    from ray import serve

    setups: dict[str, dict[str, Any]] = {
        "tenfold, 1 app": {"tenfold-all": _tenfold("models", archives)},
        "tenfold, 4 apps": {f"tenfold-{n}": _tenfold(n, {n: p}) for n, p in archives.items()},
        "plain, 1 app": {"plain-all": _plain("models", archives, replicas=2, preload=True)},
        "plain, 4 apps": {f"plain-{n}": _plain(n, {n: p}, replicas=2, preload=True) for n, p in archives.items()},
    }
    out = {}
    for setup, apps in setups.items():
        t0 = time.perf_counter()
        for app, application in apps.items():
            serve.run(application, name=app, route_prefix=f"/{app}")
        for app in apps:
            for model in archives if len(apps) == 1 else [app.split("-", 1)[1]]:
                _wait(f"{base}/{app}/{model}" if app == "tenfold-all" else f"{base}/{app}/", bodies[model], model)
        time.sleep(3.0)  # a health check or two: each interpreter's malloc trimmed, as in steady service
        pids = set().union(*(_replica_pids(app) for app in apps))
        out[setup] = {"pss_mb": _pss_mb(pids), "processes": len(pids), "ready_s": time.perf_counter() - t0}
        print(f"{setup}: {out[setup]['pss_mb']:.0f} MB in {len(pids)} processes", flush=True)
        for app in apps:
            serve.delete(app)
    return out


def _first_requests(base: str, archives: dict[str, Path], bodies: dict[str, bytes], rounds: int, port: int
                    ) -> dict[str, dict[str, list[float]]]:
    """Per set-up, the latency of each model's first request (its load) and of the requests after it."""
    from ray import serve

    serve.run(_tenfold("first", archives, max_models_per_replica=1, http_port=port, http_host="127.0.0.1"),
              name="first", route_prefix="/first")
    serve.run(_plain("plain", archives, replicas=1, preload=False), name="plain", route_prefix="/plain")
    urls = {"tenfold, Serve's route": f"{base}/first/", "tenfold, http_port": f"http://127.0.0.1:{port}/",
            "plain": f"{base}/plain/"}
    for url in urls.values():
        _wait(url, bodies[next(iter(archives))], next(iter(archives)))
    samples: dict[str, dict[str, list[float]]] = {s: {"first": [], "next": []} for s in urls}
    names = list(archives)
    for i in range(rounds):
        for setup in urls if i % 2 == 0 else reversed(urls):
            for model in names[1:] + names[:1]:  # starts past the model each holds: every first request loads
                samples[setup]["first"].append(_post(urls[setup], bodies[model], model))
                samples[setup]["next"].extend(_post(urls[setup], bodies[model], model) for _ in range(5))
        print(f"round {i + 1}/{rounds}: " + ", ".join(
            f"{s} first p50 {statistics.median(v['first']) * 1000:.0f} ms" for s, v in samples.items()), flush=True)
    serve.delete("first")
    serve.delete("plain")
    return samples


def run(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    archives = {m: common.example_archive(m) for m in models}
    bodies = {m: common.example_body(p) for m, p in archives.items()}
    report: dict[str, Any] = {"models": models, "rounds": args.rounds, "cpus": os.cpu_count(),
                              "archive_mb": {m: p.stat().st_size / 2**20 for m, p in archives.items()}}
    with common.local_serve(CPUS) as base:
        if "memory" in args.phases:
            report["memory"] = _memory(base, archives, bodies)
        if "first" in args.phases:
            samples = _first_requests(base, archives, bodies, args.rounds, common.free_port())
            report["first_request"] = {s: {"first_p50_ms": statistics.median(v["first"]) * 1000,
                                           "first_max_ms": max(v["first"]) * 1000,
                                           "next_p50_ms": statistics.median(v["next"]) * 1000,
                                           "loads": len(v["first"])} for s, v in samples.items()}
            report["first_request_samples"] = samples
    print(table(report))

    json_path, png_path = common.write_report(args.out, "models", report, lambda path: plot(report, path))
    print(f"wrote {json_path} and {png_path}")
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = [k for k in ("memory", "first_request") if k in report]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "memory":
            names = list(report["memory"])
            ax.barh(names, [report["memory"][n]["pss_mb"] for n in names])
            ax.set_xlabel(f"PSS of the replicas, MB ({len(report['models'])} models loaded)")
        else:
            names = list(report["first_request"])
            ys = range(len(names))
            ax.barh([y - 0.2 for y in ys], [report["first_request"][n]["first_p50_ms"] for n in names], height=0.4,
                    label="to a model not loaded (p50)")
            ax.barh([y + 0.2 for y in ys], [report["first_request"][n]["next_p50_ms"] for n in names], height=0.4,
                    label="to a model loaded (p50)")
            ax.set_yticks(list(ys), names)
            ax.set_xlabel("request latency, ms")
            ax.legend(fontsize=8, loc="lower right")
        ax.invert_yaxis()
    fig.suptitle(f"several models per replica: {', '.join(report['models'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def table(report: dict[str, Any]) -> str:
    parts = []
    if "memory" in report:
        memory = report["memory"]
        one = memory["tenfold, 1 app"]["pss_mb"]
        rows = [[s, r["processes"], f"{r['pss_mb']:.0f}", f"{one / r['pss_mb']:.2f}x"] for s, r in memory.items()]
        parts.append(common.markdown_table(["set-up", "processes", "PSS MB", "tenfold 1 app / this"], rows))
    if "first_request" in report:
        rows = [[s, r["loads"], f"{r['first_p50_ms']:.0f}", f"{r['first_max_ms']:.0f}", f"{r['next_p50_ms']:.1f}"]
                for s, r in report["first_request"].items()]
        parts.append(common.markdown_table(["set-up", "loads", "first request p50 ms", "max ms",
                                            "next requests p50 ms"], rows))
    return "\n\n".join(parts)
