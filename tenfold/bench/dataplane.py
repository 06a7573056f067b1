"""`tenfold bench dataplane`: requests served inside the interpreters (`http_port`) against plain Serve and
against the limit, uvicorn worker processes with no Serve at all.

Set-ups, each on 2 CPUs, serving one model:
  tenfold-port   1 tenfold replica x 2 interpreters, through http_port (the interpreters serve HTTP)
  plain-direct   2 plain Serve replicas (weights memory-mapped), RAY_SERVE_THROUGHPUT_OPTIMIZED=1: each replica
                 serves HTTP itself (direct ingress), and the load is split over their two ports
  plain-proxy    2 plain Serve replicas through Serve's default HTTP proxy
  uvicorn        2 uvicorn worker processes answering with the same code, no Ray

A Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 must be started with it, so there are two phases, each with its
own Ray: (tenfold-port, plain-proxy, uvicorn), then (tenfold-port, plain-direct, uvicorn). Within a phase the
set-ups run in interleaved rounds (A B C, C B A, ...), and each ratio is taken against the tenfold-port rounds
of the same phase. The load is wrk (keep-alive, a fixed number of connections): a C load generator costs
little CPU of the two cores it shares with what it measures. For every round, the CPU time of the serving
processes per request, and for tenfold the host's part alone (the process less its interpreters' threads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import common

MODELS = ("echo", "rnn_tagger", "minilm_embedder")
PHASES = ("proxy", "direct", "without-ray", "handles", "batching")
BATCH = 8  # the batching phase's max_batch_size: the load's connections
CPUS = 2
CONNECTIONS = 8
_CLK = os.sysconf("SC_CLK_TCK")
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open(os.getenv("TENFOLD_BODY")):read("*a")
function done(summary, latency, requests)
  local f = io.open(os.getenv("TENFOLD_OUT"), "w")
  f:write(string.format('{"requests": %d, "seconds": %f, "errors": %d, "p50_ms": %f, "p99_ms": %f}',
    summary.requests, summary.duration / 1e6, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3))
  f:close()
end
"""


# -- load and CPU ----------------------------------------------------------------------------------


def _wrk(urls: list[str], body: bytes, seconds: float) -> dict[str, Any]:
    """wrk on every URL at once (CONNECTIONS split among them); totals and the worst percentiles."""
    with tempfile.TemporaryDirectory() as tmp:
        script, body_file = Path(tmp, "post.lua"), Path(tmp, "body")
        script.write_text(_WRK_SCRIPT)
        body_file.write_bytes(body)
        procs = []
        for i, url in enumerate(urls):
            env = {**os.environ, "TENFOLD_BODY": str(body_file), "TENFOLD_OUT": f"{tmp}/out{i}.json"}
            procs.append(subprocess.Popen(
                ["wrk", "-t1", f"-c{max(1, CONNECTIONS // len(urls))}", f"-d{seconds:g}s", "--timeout", "30s",
                 "-s", str(script), url], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for p in procs:
            p.wait(timeout=seconds + 120)
        outs = [json.loads(Path(tmp, f"out{i}.json").read_text()) for i in range(len(urls))]
    return {"requests": sum(o["requests"] for o in outs), "errors": sum(o["errors"] for o in outs),
            "seconds": max(o["seconds"] for o in outs), "p50_ms": max(o["p50_ms"] for o in outs),
            "p99_ms": max(o["p99_ms"] for o in outs)}


def _ticks(path: str) -> int:
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _cpu(pids: set[int], interpreter_threads: dict[int, list[int]]) -> tuple[float, float]:
    """(all CPU seconds of `pids`, of it the interpreters' server threads)."""
    total = sum(_ticks(f"/proc/{pid}/stat") for pid in pids)
    inner = sum(_ticks(f"/proc/{pid}/task/{tid}/stat") for pid, tids in interpreter_threads.items() for tid in tids)
    return total / _CLK, inner / _CLK


class _Setup:
    """A set-up ready to take load: where to send it, and which processes serve it."""

    def __init__(self, name: str, urls: list[str], pids: set[int],
                 interpreter_threads: dict[int, list[int]] | None = None) -> None:
        self.name, self.urls, self.pids = name, urls, pids
        self.interpreter_threads = interpreter_threads or {}

    def measure(self, body: bytes, seconds: float) -> dict[str, Any]:
        cpu0, inner0 = _cpu(self.pids, self.interpreter_threads)
        load = _wrk(self.urls, body, seconds)
        cpu1, inner1 = _cpu(self.pids, self.interpreter_threads)
        n = max(1, load["requests"])
        row = {"setup": self.name, **load, "rps": load["requests"] / load["seconds"],
               "cpu_ms_per_request": 1000.0 * (cpu1 - cpu0) / n}
        if self.interpreter_threads:
            row["host_cpu_ms_per_request"] = 1000.0 * ((cpu1 - cpu0) - (inner1 - inner0)) / n
        return row


def _warm(urls: list[str], body: bytes, timeout_s: float = 300) -> None:
    import requests

    for url in urls:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
                if r.status_code == 200:
                    break
                raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:300]}")
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _tenfold(archive: Path, port: int, name: str = "tenfold-port", **args: Any) -> _Setup:
    from ray import serve

    from tenfold.integration import app_builder

    app = app_builder({"archive": str(archive), "interpreters": 2, "num_cpus": CPUS, "threads_per_interpreter": 1,
                       "http_port": port, "http_host": "127.0.0.1", "name": "tenfold", **args})
    handle = serve.run(app, name=name, route_prefix=f"/{name}")
    threads = handle.threads.remote().result()
    return _Setup(name, [f"http://127.0.0.1:{port}/"], {threads["pid"]},
                  {threads["pid"]: threads["interpreter_threads"]})


def _plain(archive: Path, serve_url: str, direct: bool) -> _Setup:
    from ray import serve

    from .serve import _application

    name = "plain-direct" if direct else "plain-proxy"
    handle = serve.run(_application("plain-mmap", archive, 2, CPUS), name=name, route_prefix=f"/{name}")
    pids = {handle.pid.remote().result() for _ in range(40)}
    if direct:  # each replica listens on a port of its own from Serve's direct-ingress range
        urls = [f"{base}{name}" for base in _direct_ports(pids)]
    else:
        urls = [f"{serve_url}/{name}"]
        pids |= common.serve_proxy_pids()
    return _Setup(name, urls, pids)


def _direct_ports(pids: set[int]) -> list[str]:
    """The direct-ingress HTTP port (Serve's range 30000-31000) that each replica process listens on."""
    import psutil

    found = {c.pid: c.laddr.port for c in psutil.net_connections("tcp")
             if c.status == psutil.CONN_LISTEN and c.pid in pids and 30000 <= c.laddr.port <= 31000}
    if len(found) < len(pids):
        raise RuntimeError(f"expected a direct-ingress port for each of the replicas {sorted(pids)}, found {found}")
    return [f"http://127.0.0.1:{p}/" for p in sorted(found.values())]


@contextlib.contextmanager
def _uvicorn(archive: Path, port: int) -> Iterator[_Setup]:
    """2 uvicorn worker processes running `tenfold.bench._uvicorn_app` on `port`."""
    env = {**os.environ, "TENFOLD_BENCH_ARCHIVE": str(archive), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "tenfold.bench._uvicorn_app:app", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "2", "--loop", "uvloop", "--http", "httptools",
                             "--no-access-log", "--log-level", "warning"], env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        import psutil

        deadline = time.monotonic() + 120
        while len(psutil.Process(proc.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = {proc.pid, *(c.pid for c in psutil.Process(proc.pid).children())}
        yield _Setup("uvicorn", [url], pids)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def _interpreters_alone(archive: Path, port: int) -> Iterator[_Setup]:
    """The data plane without Ray: an InterpreterPool of 2 in this process with the model and its servers."""
    from tenfold.integration import codec
    from tenfold.integration._server import Served
    from tenfold.integration.config import AppArgs
    from tenfold.integration.dataplane import DataPlane
    from tenfold.packaging import replicate
    from tenfold.packaging.replicated import prepare_interpreter
    from tenfold.runtime import InterpreterPool

    args = AppArgs(archive=str(archive), http_port=port, http_host="127.0.0.1")
    with InterpreterPool(2, backend="namespaces", threads_per_interpreter=1, initializer=prepare_interpreter) as pool:
        with replicate(pool, str(archive)) as model:
            served = Served(model.model_id, codec.Interface.of(model.manifest))
            plane = DataPlane(pool, {"": served}, args, owner="bench", manifest=b"{}", openapi=b"{}", stats=dict)
            try:
                yield _Setup("interpreters", [f"http://127.0.0.1:{port}/"], {os.getpid()},
                             {os.getpid(): plane.threads()})
            finally:
                plane.stop()


def _without_ray(models: list[str], build: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The interpreters' servers in a plain process against 2 uvicorn processes, no Ray anywhere: what the
    servers cost apart from the Ray worker that hosts them in a replica."""
    rows: list[dict[str, Any]] = []
    for model in models:
        archive = common.example_archive(model, build)
        body = _body(model, archive)
        with _interpreters_alone(archive, common.free_port()) as mine, _uvicorn(archive, common.free_port()) as limit:
            setups = [mine, limit]
            for s in setups:
                _warm(s.urls, body)
                s.measure(body, 1.0)
            for r in range(args.rounds):
                for s in (setups if r % 2 == 0 else setups[::-1]):
                    row = {"model": model, "phase": "without-ray", "round": r, **s.measure(body, args.seconds)}
                    rows.append(row)
                    print(f"  {model:16} {row['setup']:13} round {r}: {row['rps']:9.0f} req/s  "
                          f"p99 {row['p99_ms']:7.2f} ms  cpu/req {row['cpu_ms_per_request']:.3f} ms", flush=True)
    return rows


def without_ray_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["setup"] == "interpreters"]
        theirs = [r for r in rows if r["model"] == model and r["setup"] == "uvicorn"]
        out.append({"model": model, "interpreters_rps": statistics.median(r["rps"] for r in mine),
                    "uvicorn_rps": statistics.median(r["rps"] for r in theirs),
                    "ratio": statistics.median(a["rps"] / b["rps"] for a, b in zip(mine, theirs) if b["rps"])})
    return out


# -- phases -----------------------------------------------------------------------------------------


def _phase(direct: bool, models: list[str], build: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray

    saved = dict(os.environ)
    if direct:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    rows: list[dict[str, Any]] = []
    try:
        with common.local_serve(num_cpus=3 * CPUS) as serve_url:
            for model in models:
                archive = common.example_archive(model, build)
                body = _body(model, archive)
                setups = [_tenfold(archive, common.free_port()), _plain(archive, serve_url, direct)]
                with _uvicorn(archive, common.free_port()) as limit:
                    setups.append(limit)
                    for s in setups:
                        _warm(s.urls, body)
                        s.measure(body, 1.0)  # warm-up
                    for r in range(args.rounds):
                        for s in (setups if r % 2 == 0 else setups[::-1]):
                            row = {"model": model, "phase": "direct" if direct else "proxy", "round": r,
                                   **s.measure(body, args.seconds)}
                            rows.append(row)
                            print(f"  {model:16} {row['setup']:13} round {r}: {row['rps']:9.0f} req/s  "
                                  f"p99 {row['p99_ms']:7.2f} ms  cpu/req {row['cpu_ms_per_request']:.3f} ms"
                                  + (f"  host cpu/req {row['host_cpu_ms_per_request']:.4f} ms"
                                     if "host_cpu_ms_per_request" in row else ""), flush=True)
                from ray import serve

                for app in ("tenfold-port", "plain-direct" if direct else "plain-proxy"):
                    serve.delete(app)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if ray.is_initialized():
            ray.shutdown()
    return rows


def _batching_phase(args: argparse.Namespace, build: Path) -> list[dict[str, Any]]:
    """The embedder on http_port without and with max_batch_size, side by side in interleaved rounds: each
    interpreter joins the requests of its own connections."""
    from ray import serve

    rows: list[dict[str, Any]] = []
    archive = common.example_archive("minilm_embedder", build)
    body = _body("minilm_embedder", archive)
    with common.local_serve(num_cpus=3 * CPUS):
        setups = [_tenfold(archive, common.free_port()),
                  _tenfold(archive, common.free_port(), "tenfold-port-batched", max_batch_size=BATCH)]
        for s in setups:
            _warm(s.urls, body)
            s.measure(body, 1.0)  # warm-up
        for r in range(args.rounds):
            for s in (setups if r % 2 == 0 else setups[::-1]):
                row = {"model": "minilm_embedder", "phase": "batching", "round": r, **s.measure(body, args.seconds)}
                rows.append(row)
                print(f"  {row['setup']:21} round {r}: {row['rps']:7.1f} req/s  p99 {row['p99_ms']:7.1f} ms  "
                      f"cpu/req {row['cpu_ms_per_request']:.2f} ms", flush=True)
        for s in setups:
            serve.delete(s.name)
    return rows


def batching_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each set-up's median throughput, p99 and CPU per request, and batched over unbatched (per-round ratios)."""
    by = {name: [r for r in rows if r["setup"] == name] for name in ("tenfold-port", "tenfold-port-batched")}
    ratios = [b["rps"] / a["rps"] for a, b in zip(by["tenfold-port"], by["tenfold-port-batched"]) if a["rps"]]
    return {"setups": {name: {"rps": statistics.median(r["rps"] for r in rs),
                              "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                              "cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in rs),
                              "errors": sum(r["errors"] for r in rs)} for name, rs in by.items()},
            "batched_over_unbatched": statistics.median(ratios), "by_round": ratios, "max_batch_size": BATCH}


# -- the handle path ---------------------------------------------------------------------------------

#: Serve's replica-side settings that RAY_SERVE_THROUGHPUT_OPTIMIZED=1 changes (the router's and gRPC's are the
#: caller's), tried one by one and together for a tenfold replica's handle calls.
HANDLE_VARIANTS: dict[str, dict[str, str]] = {
    "serve-defaults": {},
    "user-code-on-the-loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "all-replica-settings": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                             "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000", "RAY_SERVE_LOG_TO_STDERR": "0",
                             "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1"},
}


async def _handle_load(handle: Any, inputs: list[Any], seconds: float, outstanding: int = 16) -> int:
    import asyncio

    deadline, done = time.monotonic() + seconds, 0

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await handle.remote(*inputs)
            done += 1

    await asyncio.gather(*(caller() for _ in range(outstanding)))
    return done


def _handle_phase(args: argparse.Namespace, build: Path) -> list[dict[str, Any]]:
    """Host CPU per handle call of one tenfold replica (echo, 2 interpreters) under each of HANDLE_VARIANTS,
    deployed side by side and loaded in interleaved rounds from this driver (16 calls outstanding)."""
    import asyncio

    import ray
    from ray import serve

    from tenfold.integration import app_builder

    archive = common.example_archive("echo", build)
    inputs = ["tenfold serves Python models"]
    rows: list[dict[str, Any]] = []
    try:
        with common.local_serve(num_cpus=3 * CPUS):
            handles, pids = {}, {}
            for variant, env in HANDLE_VARIANTS.items():
                app = app_builder({"archive": str(archive), "interpreters": 2, "num_cpus": CPUS,
                                   "threads_per_interpreter": 1, "env_vars": env, "name": variant})
                handles[variant] = serve.run(app, name=variant, route_prefix=f"/{variant}")
                pids[variant] = handles[variant].stats.remote().result()["pid"]
                asyncio.run(_handle_load(handles[variant], inputs, 1.0))  # warm-up
            names = list(HANDLE_VARIANTS)
            for r in range(args.rounds):
                for variant in (names if r % 2 == 0 else names[::-1]):
                    cpu0, _ = _cpu({pids[variant]}, {})
                    t0 = time.monotonic()
                    calls = asyncio.run(_handle_load(handles[variant], inputs, args.seconds))
                    took = time.monotonic() - t0
                    cpu1, _ = _cpu({pids[variant]}, {})
                    row = {"variant": variant, "round": r, "calls": calls, "calls_per_s": calls / took,
                           "replica_cpu_ms_per_call": 1000.0 * (cpu1 - cpu0) / max(1, calls)}
                    rows.append(row)
                    print(f"  handle {variant:22} round {r}: {row['calls_per_s']:7.0f} calls/s  replica cpu/call "
                          f"{row['replica_cpu_ms_per_call']:.3f} ms", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return rows


def _handle_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for variant in HANDLE_VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if mine:
            out.append({"variant": variant, "env": HANDLE_VARIANTS[variant],
                        "calls_per_s": statistics.median(r["calls_per_s"] for r in mine),
                        "replica_cpu_ms_per_call": statistics.median(r["replica_cpu_ms_per_call"] for r in mine)})
    return out


def _body(model: str, archive: Path) -> bytes:
    return common.example_body(archive)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and peer: median throughput, p99 and CPU per request, and the ratio of tenfold-port's over the
    peer's throughput in the same phase (the median of per-round ratios)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for phase in ("proxy", "direct"):
            mine = [r for r in rows if r["model"] == model and r["phase"] == phase and r["setup"] == "tenfold-port"]
            if not mine:
                continue
            for peer in dict.fromkeys(r["setup"] for r in rows if r["model"] == model and r["phase"] == phase):
                if peer == "tenfold-port" and phase == "direct":
                    continue
                theirs = [r for r in rows if r["model"] == model and r["phase"] == phase and r["setup"] == peer]
                ratios = [a["rps"] / b["rps"] for a, b in zip(mine, theirs) if b["rps"]]
                out.append({
                    "model": model, "phase": phase, "setup": peer,
                    "rps": statistics.median(r["rps"] for r in theirs),
                    "p99_ms": statistics.median(r["p99_ms"] for r in theirs),
                    "cpu_ms_per_request": statistics.median(r["cpu_ms_per_request"] for r in theirs),
                    "host_cpu_ms_per_request": (statistics.median(r["host_cpu_ms_per_request"] for r in theirs)
                                                if "host_cpu_ms_per_request" in theirs[0] else None),
                    "errors": sum(r["errors"] for r in theirs),
                    "tenfold_ratio": statistics.median(ratios) if ratios and peer != "tenfold-port" else None,
                })
    return out


def table(summary: list[dict[str, Any]]) -> str:
    rows = [[s["model"], s["setup"], f"{s['rps']:,.0f}", f"{s['p99_ms']:.2f}", f"{s['cpu_ms_per_request']:.3f}",
             "" if s["host_cpu_ms_per_request"] is None else f"{s['host_cpu_ms_per_request']:.4f}",
             "" if s["tenfold_ratio"] is None else f"{s['tenfold_ratio']:.2f}x", str(s["errors"])]
            for s in summary]
    return common.markdown_table(["model", "set-up", "req/s", "p99 ms", "CPU ms/req", "host CPU ms/req",
                                  "tenfold-port vs it", "errors"], rows, numeric_from=2)


def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("tenfold bench dataplane needs wrk (Debian: apt-get install wrk; ./dev bench installs it)",
              file=sys.stderr)
        return 2
    models = args.models.split(",") if args.models else list(MODELS)
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        print(f"unknown models {unknown}; choose from {list(MODELS)}", file=sys.stderr)
        return 2
    build = Path("build")
    phases = set(args.phases.split(","))
    unknown = sorted(phases - set(PHASES))
    if unknown:
        print(f"unknown phases {unknown}; choose from {list(PHASES)}", file=sys.stderr)
        return 2
    rows = []
    for direct, phase in ((False, "proxy"), (True, "direct")):
        if phase in phases:
            print(f"phase: plain Serve {'with direct ingress' if direct else 'through its proxy'}", flush=True)
            rows += _phase(direct, models, build, args)
    summary = summarize(rows)
    alone_rows = []
    if "without-ray" in phases:
        print("phase: the interpreters' servers against uvicorn processes, without Ray", flush=True)
        alone_rows = _without_ray(models, build, args)
    alone = without_ray_summary(alone_rows) if alone_rows else []
    handle_rows = []
    if "handles" in phases:
        print("phase: handle calls to a tenfold replica under Serve's replica settings", flush=True)
        handle_rows = _handle_phase(args, build)
    handles = _handle_summary(handle_rows)
    batching_rows = []
    if "batching" in phases:
        print(f"phase: the embedder on http_port without and with max_batch_size {BATCH}", flush=True)
        batching_rows = _batching_phase(args, build)
    batching = batching_summary(batching_rows) if batching_rows else None
    if summary:
        print(table(summary))
    if alone:
        print(common.markdown_table(["model (no Ray)", "interpreters req/s", "uvicorn req/s", "ratio"],
                                    [[a["model"], f"{a['interpreters_rps']:,.0f}", f"{a['uvicorn_rps']:,.0f}",
                                      f"{a['ratio']:.2f}x"] for a in alone]))
    if handles:
        print(common.markdown_table(["replica settings", "calls/s", "replica CPU ms/call"],
                                    [[h["variant"], f"{h['calls_per_s']:,.0f}", f"{h['replica_cpu_ms_per_call']:.3f}"]
                                     for h in handles]))
    if batching:
        print(common.markdown_table(["set-up (minilm_embedder, http_port)", "req/s", "p99 ms", "CPU ms/req"],
                                    [[name, f"{b['rps']:.1f}", f"{b['p99_ms']:.0f}", f"{b['cpu_ms_per_request']:.1f}"]
                                     for name, b in batching["setups"].items()]))
        print(f"batched / unbatched: {batching['batched_over_unbatched']:.2f}x the throughput (by round: "
              + ", ".join(f"{r:.2f}" for r in batching["by_round"]) + ")")
    print(capacity(summary))
    report = {"rows": rows, "summary": summary, "without_ray_rows": alone_rows, "without_ray": alone,
              "handle_rows": handle_rows, "handles": handles, "batching_rows": batching_rows,
              "batching": batching, "cpus": CPUS,
              "connections": CONNECTIONS, "seconds": args.seconds, "rounds": args.rounds,
              "machine": f"{os.cpu_count()} cores"}
    json_path, png_path = common.write_report(args.out, "dataplane", report, lambda p: _plot(summary, p, batching))
    print(f"wrote {json_path} and {png_path}")
    return 0


def capacity(summary: list[dict[str, Any]]) -> str:
    """What the figures mean for sizing: on http_port a request costs the host ~nothing, so a replica's rate
    is its interpreters' (1 / (model ms + serving ms) each); the echo row gives the serving cost per request."""
    echo = [s for s in summary if s["model"] == "echo" and s["setup"] == "tenfold-port"]
    if not echo:
        return ""
    e = echo[0]
    serving_ms = e["cpu_ms_per_request"] - (e["host_cpu_ms_per_request"] or 0.0)
    return (f"\nSizing (http_port): the host spends {e['host_cpu_ms_per_request'] or 0.0:.4f} ms per request; an "
            f"interpreter spends {serving_ms:.3f} ms of CPU per request besides the model (HTTP, JSON, the load "
            "generator's share on this machine). With a model of M ms, one interpreter serves about "
            f"1000 / (M + {serving_ms:.2f}) requests/s, a replica N times that, up to one interpreter per core and "
            "15 per process.")


def _plot(summary: list[dict[str, Any]], path: Path, batching: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(s["model"] for s in summary))
    setups = ["tenfold-port", "plain-direct", "plain-proxy", "uvicorn"]
    panels = len(models) + (batching is not None)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.8), squeeze=False)
    if batching is not None:
        ax = axes[0][-1]
        names = list(batching["setups"])
        ax.bar([f"max_batch_size {batching['max_batch_size']}" if "batched" in n else "unbatched" for n in names],
               [batching["setups"][n]["rps"] for n in names], color=["tab:green", "tab:olive"])
        ax.set_title(f"minilm_embedder on http_port: {batching['batched_over_unbatched']:.2f}x batched")
        ax.set_ylabel("requests/s (2 CPUs, wrk, 8 connections)")
    for ax, model in zip(axes[0], models):
        values = []
        for setup in setups:
            found = [s["rps"] for s in summary if s["model"] == model and s["setup"] == setup]
            values.append(statistics.median(found) if found else 0.0)
        ax.bar(setups, values, color=["tab:green", "tab:blue", "tab:gray", "tab:orange"])
        ax.set_title(model)
        ax.set_ylabel("requests/s (2 CPUs, wrk, 8 connections)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
