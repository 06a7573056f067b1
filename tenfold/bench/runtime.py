"""`tenfold bench runtime`: namespace interpreters against threads, processes and TorchScript.

One run measures, side by side and on the same models (see `runtime_models`):

- throughput of N namespace interpreters, N threads of one interpreter, N spawned processes and a
  TorchScript module driven by N host threads, every worker limited to one intra-op thread;
- memory each interpreter with torch imported adds to the process (RSS and private/USS);
- start-up: one interpreter with torch imported ready, and two started in parallel;
- host -> interpreter -> host round trip of a trivial call, from the pool's owner thread and through
  `pool.submit(...).result()`;

and checks them against the runtime's targets. Start-up and memory are measured in fresh processes, because
a process keeps its interpreters for life and would otherwise hand the measurement a warm one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tenfold.runtime.pool import Backend

from . import runtime_models

MODES = ("interpreters", "threads", "processes", "torchscript")
MODE_LABELS = {
    "interpreters": "N interpreters (namespaces)",
    "threads": "N threads, 1 interpreter",
    "processes": "N processes (spawn)",
    "torchscript": "TorchScript, N host threads",
}
PYTHON_HEAVY = ("mlp", "rnn", "generate")
MB = 1 << 20


@dataclasses.dataclass
class BenchConfig:
    """What one run measures, and for how long."""

    sizes: list[int]
    models: list[str]
    seconds: float
    warmup_s: float
    reps: int
    startup_reps: int
    round_trips: int
    extra_interpreters: int
    out: Path
    quick: bool

    @classmethod
    def make(
        cls,
        *,
        sizes: list[int],
        models: list[str] | None,
        seconds: float | None,
        reps: int | None,
        round_trips: int | None,
        out: Path,
        quick: bool,
    ) -> BenchConfig:
        """Defaults for the full run, or for `quick` (a smoke run whose figures are not to be quoted)."""
        return cls(
            sizes=sizes,
            models=models or (["mlp", "conv"] if quick else list(runtime_models.MODELS)),
            seconds=seconds if seconds is not None else (0.3 if quick else 3.0),
            warmup_s=0.05 if quick else 0.5,
            reps=reps if reps is not None else (1 if quick else 3),
            startup_reps=1 if quick else 3,
            round_trips=round_trips if round_trips is not None else (2_000 if quick else 20_000),
            extra_interpreters=0 if quick else 1,
            out=out,
            quick=quick,
        )


# -- workers of each mode -----------------------------------------------------------------------


class _PoolDriver:
    """Interpreters or host threads of an InterpreterPool; every one runs the model at once."""

    def __init__(self, size: int, backend: Backend, scripted: bool) -> None:
        from tenfold.runtime import InterpreterPool

        self.scripted = scripted
        self.pool = InterpreterPool(size, backend=backend, threads_per_interpreter=1)

    def load(self, name: str) -> None:
        if self.pool.backend == "threads":
            runtime_models.load(name, self.scripted)  # threads share the host's module: build once
        else:
            self.pool.broadcast(runtime_models.load, name, self.scripted)

    def run(self, name: str, warmup_s: float, seconds: float) -> list[tuple[int, float]]:
        return self.pool.broadcast(runtime_models.run, name, self.scripted, warmup_s, seconds)

    def info(self) -> list[dict[str, Any]]:
        return self.pool.broadcast(runtime_models.worker_info)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _ProcessFleet:
    """Spawned processes, one model each, kept across sizes; started (torch imported) before timing."""

    def __init__(self) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self.go = self._ctx.Event()
        self.conns: list[Any] = []
        self.procs: list[Any] = []

    def grow(self, size: int) -> None:
        new = []
        while len(self.procs) < size:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=runtime_models.process_worker, args=(child, self.go), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            new.append(parent)
        for conn in new:  # spawned together, waited for together
            self.answer(conn)

    def answer(self, conn: Any) -> Any:
        status, value = conn.recv()
        if status == "error":
            raise RuntimeError(f"benchmark process failed: {value}")
        return value

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


class _ProcessDriver:
    """The first `size` processes of a fleet."""

    def __init__(self, fleet: _ProcessFleet, size: int) -> None:
        fleet.grow(size)
        self.fleet = fleet
        self.conns = fleet.conns[:size]
        self.procs = fleet.procs[:size]

    def _all(self, *message: Any) -> list[Any]:
        for conn in self.conns:
            conn.send(message)
        return [self.fleet.answer(conn) for conn in self.conns]

    def load(self, name: str) -> None:
        self._all("load", name, False)

    def run(self, name: str, warmup_s: float, seconds: float) -> list[tuple[int, float]]:
        # Every process says it is armed, then all are released at once, so they count over the same
        # interval (and whatever they did before, like loading, is not in it).
        self.fleet.go.clear()
        self._all("arm", name, False, warmup_s, seconds)
        self.fleet.go.set()
        return [self.fleet.answer(conn) for conn in self.conns]

    def info(self) -> list[dict[str, Any]]:
        return self._all("info")

    def memory(self) -> list[dict[str, float]]:
        return [_memory(proc.pid) for proc in self.procs]

    def close(self) -> None:
        """Nothing: the fleet outlives the sizes."""


def _driver(mode: str, size: int, fleet: _ProcessFleet) -> Any:
    if mode == "interpreters":
        return _PoolDriver(size, "namespaces", scripted=False)
    if mode == "threads":
        return _PoolDriver(size, "threads", scripted=False)
    if mode == "torchscript":
        return _PoolDriver(size, "threads", scripted=True)
    if mode == "processes":
        return _ProcessDriver(fleet, size)
    raise ValueError(f"unknown mode {mode!r}")


# -- throughput ---------------------------------------------------------------------------------


def measure_throughput(cfg: BenchConfig, log: Any = print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Inferences/s of every (model, mode, size): median over `reps` runs of `seconds` each.

    Repetitions are interleaved across models and modes, so a slow minute on a noisy machine lands on
    every mode rather than on one.
    """
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    extras: dict[str, Any] = {"worker_info": {}, "process_memory": {}}
    fleet = _ProcessFleet()
    try:
        fleet.grow(max(cfg.sizes))  # spawned in parallel, once
        for size in cfg.sizes:
            _measure_size(cfg, size, fleet, rows, extras, log)
    finally:
        fleet.close()
    out = []
    for row in rows.values():
        row["median"] = statistics.median(row["runs"])
        out.append(row)
    _add_ratios(out)
    return out, extras


def _measure_size(
    cfg: BenchConfig, size: int, fleet: _ProcessFleet, rows: dict[tuple[str, str, int], dict[str, Any]],
    extras: dict[str, Any], log: Any,
) -> None:
    drivers: dict[str, Any] = {}
    try:
        for mode in MODES:
            t0 = time.perf_counter()
            drivers[mode] = driver = _driver(mode, size, fleet)
            for name in cfg.models:
                if _runs(name, mode):
                    driver.load(name)
            extras["worker_info"][f"{mode}@{size}"] = driver.info()
            log(f"  {mode} x{size}: ready in {time.perf_counter() - t0:.1f} s")
        if "processes" in drivers:
            extras["process_memory"][str(size)] = drivers["processes"].memory()
        for rep in range(cfg.reps):
            for name in cfg.models:
                for mode in [m for m in MODES if _runs(name, m)]:
                    per_worker = drivers[mode].run(name, cfg.warmup_s, cfg.seconds)
                    rate = sum(n / s for n, s in per_worker)
                    row = rows.setdefault(
                        (name, mode, size),
                        {"model": name, "mode": mode, "size": size, "runs": [], "per_worker": []},
                    )
                    row["runs"].append(rate)
                    row["per_worker"].append([n / s for n, s in per_worker])
                    log(f"  rep {rep + 1}/{cfg.reps} {name:<9} {mode:<12} x{size}: {rate:>10,.0f} inf/s")
    finally:
        for driver in drivers.values():
            driver.close()


def _runs(name: str, mode: str) -> bool:
    """Whether model `name` runs in `mode` (TorchScript takes only the models it can script or trace)."""
    return mode != "torchscript" or name in runtime_models.SCRIPTABLE


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    index = {(r["model"], r["mode"], r["size"]): r["median"] for r in rows}
    for r in rows:
        one = index.get((r["model"], "interpreters", 1))
        threads = index.get((r["model"], "threads", r["size"]))
        r["vs_one_interpreter"] = r["median"] / one if one else None
        r["vs_threads"] = r["median"] / threads if threads else None


# -- round trip ---------------------------------------------------------------------------------


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {
        "median_us": s[len(s) // 2] / 1e3,
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3,
        "mean_us": sum(s) / len(s) / 1e3,
        "calls": len(s),
    }


def _owner_thread_round_trips(pool: Any, n: int, arg: Any) -> list[int]:
    # The pool's own view of a call: `interpreter.call` timed on the interpreter's owner thread, where
    # the pool runs it. Posted as a job to that thread (pitfall 5: only it may enter the interpreter);
    # it reaches into the pool's internals because no public API exposes the bare call.
    interpreter = pool._slots[0].interpreter
    done: Future = Future()

    def job() -> None:
        try:
            call, fn, perf = interpreter.call, runtime_models.echo, time.perf_counter_ns
            samples = []
            for _ in range(n):
                t0 = perf()
                call(fn, (arg,), {})
                samples.append(perf() - t0)
            done.set_result(samples)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting host thread
            done.set_exception(exc)

    interpreter.post(job)
    return done.result()


def _submit_round_trips(pool: Any, n: int, arg: Any) -> list[int]:
    perf, submit, fn = time.perf_counter_ns, pool.submit, runtime_models.echo
    samples = []
    for _ in range(n):
        t0 = perf()
        submit(fn, arg).result()
        samples.append(perf() - t0)
    return samples


def measure_round_trip(cfg: BenchConfig) -> dict[str, Any]:
    """Median and p99 of a trivial call with a small argument, after a warm-up of a tenth as many."""
    from tenfold.runtime import InterpreterPool

    arg = 12345
    warm = max(100, cfg.round_trips // 10)
    out: dict[str, Any] = {"argument": repr(arg)}
    with InterpreterPool(1, backend="namespaces", threads_per_interpreter=1) as pool:
        _owner_thread_round_trips(pool, warm, arg)
        out["interpreter_call"] = _percentiles(_owner_thread_round_trips(pool, cfg.round_trips, arg))
        _submit_round_trips(pool, warm, arg)
        out["interpreter_submit"] = _percentiles(_submit_round_trips(pool, cfg.round_trips, arg))
    with InterpreterPool(1, backend="threads") as pool:
        _submit_round_trips(pool, warm, arg)
        out["threads_submit"] = _percentiles(_submit_round_trips(pool, cfg.round_trips, arg))
    # The floor of any executor that hands a call to another thread and waits for its Future.
    with ThreadPoolExecutor(1) as pool:
        _submit_round_trips(pool, warm, arg)
        out["stdlib_thread_pool_submit"] = _percentiles(_submit_round_trips(pool, cfg.round_trips, arg))
    return out


# -- start-up and memory (in fresh processes) ---------------------------------------------------


def _memory(pid: int | None = None) -> dict[str, float]:
    """RSS and USS (private) of a process in MB, plus its private dirty pages from smaps_rollup."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    out = {"rss_mb": info.rss / MB, "uss_mb": info.uss / MB}
    try:
        with open(f"/proc/{pid or 'self'}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Private_Dirty:"):
                    out["private_dirty_mb"] = int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return out


def _start(size: int) -> tuple[Any, float, list[dict[str, Any]]]:
    """A pool of `size` new interpreters with torch imported: (pool, seconds to ready, imports)."""
    from tenfold.runtime import InterpreterPool

    t0 = time.perf_counter()
    pool = InterpreterPool(size, backend="namespaces", threads_per_interpreter=1)
    imports = pool.broadcast(runtime_models.import_torch)
    return pool, time.perf_counter() - t0, imports


def _startup_child(order: list[int], extra: int) -> dict[str, Any]:
    """In a fresh process with torch imported: start new interpreters in groups of the sizes in `order`
    (each group in parallel, while the earlier ones stay alive, so none is a reused one), then `extra`
    more one at a time; the time each group took to be ready with torch, and the memory after it."""
    t0 = time.perf_counter()
    import torch

    host_import_s = time.perf_counter() - t0  # the same import in a plain process, for comparison
    del torch  # imported so the host looks like a serving replica, and is not counted per interpreter
    memory = [_memory()]
    pools, groups = [], []
    for size in [*order, *[1] * extra]:
        pool, ready_s, imports = _start(size)
        pools.append(pool)
        memory.append(_memory())
        groups.append({
            "size": size,
            "ready_s": ready_s,
            "torch_import_s": [i["import_s"] for i in imports],
            "torch_import_cpu_s": [i["import_cpu_s"] for i in imports],
        })
    for pool in pools:
        pool.shutdown()
    return {"groups": groups, "memory": memory, "host_import_s": host_import_s}


def _run_child(order: list[int], extra: int) -> dict[str, Any]:
    from tenfold.runtime import with_glibc_tunables

    env = with_glibc_tunables({**os.environ, "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "tenfold.bench.runtime", "startup-child", ",".join(map(str, order)), str(extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"start-up measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_startup(cfg: BenchConfig, log: Any = print) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start-up of 1 interpreter and of 2 in parallel, and the memory each adds; one fresh process per
    repetition, the order of the two alternating between repetitions."""
    ready: dict[int, list[float]] = {1: [], 2: []}
    imports: dict[int, list[float]] = {1: [], 2: []}
    imports_cpu: dict[int, list[float]] = {1: [], 2: []}
    steps: list[dict[str, list[float]]] = []  # per added interpreter, in order of addition
    host = None
    host_imports = []
    for rep in range(cfg.startup_reps):
        order = [1, 2] if rep % 2 == 0 else [2, 1]
        child = _run_child(order, cfg.extra_interpreters)
        host = host or child["memory"][0]
        host_imports.append(child["host_import_s"])
        index = 0
        for i, group in enumerate(child["groups"]):
            before, after = child["memory"][i], child["memory"][i + 1]
            if i < len(order):
                ready[group["size"]].append(group["ready_s"])
                imports[group["size"]].extend(group["torch_import_s"])
                imports_cpu[group["size"]].extend(group["torch_import_cpu_s"])
            for _ in range(group["size"]):  # a group of k started together: each adds 1/k of the growth
                if index == len(steps):
                    steps.append({})
                for key in after:
                    steps[index].setdefault(key, []).append((after[key] - before[key]) / group["size"])
                index += 1
        log(f"  rep {rep + 1}/{cfg.startup_reps}: 1 interpreter with torch ready in {ready[1][-1]:.2f} s, "
            f"2 in parallel in {ready[2][-1]:.2f} s")
    one, two = statistics.median(ready[1]), statistics.median(ready[2])
    startup = {
        "one_ready_s": one,
        "two_parallel_ready_s": two,
        "two_vs_one": two / one,
        "one_runs_s": ready[1],
        "two_runs_s": ready[2],
        "torch_import_in_interpreter_s": statistics.median(imports[1]),
        "torch_import_in_interpreter_cpu_s": statistics.median(imports_cpu[1]),
        "torch_import_two_in_parallel_s": statistics.median(imports[2]),
        "torch_import_two_in_parallel_cpu_s": statistics.median(imports_cpu[2]),
        "torch_import_in_host_s": statistics.median(host_imports),
    }
    memory = {
        "host_with_torch": host,
        "per_interpreter": [{key: statistics.median(v) for key, v in step.items()} for step in steps],
    }
    return startup, memory


# -- targets, table, plot -----------------------------------------------------------------------


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The runtime's target figures, each with its value, limit and whether this run reached it."""
    targets = []

    def add(name: str, value: float | None, op: str, limit: float, unit: str, note: str = "") -> None:
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        targets.append({"target": name, "value": value, "op": op, "limit": limit, "unit": unit, "pass": ok,
                        "note": note})

    index = {(r["model"], r["mode"], r["size"]): r for r in results.get("throughput", [])}
    for name in PYTHON_HEAVY:
        row = index.get((name, "interpreters", 2))
        if row is None:
            continue
        add(f"{name}: 2 interpreters vs 1", row["vs_one_interpreter"], ">=", 1.8 if name == "generate" else 1.85, "x")
        add(f"{name}: 2 interpreters vs 2 threads", row["vs_threads"], ">=", 2.5, "x")
    rt = results.get("round_trip")
    if rt:
        add("round trip, owner thread (median)", rt["interpreter_call"]["median_us"], "<=", 10.0, "us")
        add("round trip, submit().result() (median)", rt["interpreter_submit"]["median_us"], "<=", 10.0, "us",
            "includes the Future and the hand-off to the owner thread")
    st = results.get("startup")
    if st:
        add("1 interpreter with torch ready", st["one_ready_s"], "<=", 1.5, "s")
        add("2 in parallel vs 1", st["two_vs_one"], "<=", 1.3, "x")
    mem = results.get("memory")
    if mem:
        worst = max(step["uss_mb"] for step in mem["per_interpreter"])
        add("private memory per interpreter with torch (worst step)", worst, "<=", 160.0, "MB")
    return targets


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:,.0f}"


def format_table(results: dict[str, Any]) -> str:
    """The human-readable summary printed at the end of a run."""
    lines = []
    meta = results["meta"]
    lines.append(
        f"tenfold bench runtime  ({meta['when']}, {meta['cpus']} cpus, load avg before "
        f"{meta['loadavg_before'][0]:.2f} / after {meta['loadavg_after'][0]:.2f}"
        f"{', QUICK: not for quoting' if meta['quick'] else ''})"
    )
    rows = results.get("throughput", [])
    if rows:
        lines.append("")
        lines.append(f"{'model':<10}{'mode':<14}{'N':>3}{'inf/s':>11}{'min..max':>18}{'x 1 interp':>12}"
                     f"{'x threads':>11}")
        order = {m: i for i, m in enumerate(MODES)}
        for r in sorted(rows, key=lambda r: (results["meta"]["models"].index(r["model"]), r["size"], order[r["mode"]])):
            spread = f"{_fmt_rate(min(r['runs']))}..{_fmt_rate(max(r['runs']))}"
            one = f"{r['vs_one_interpreter']:.2f}x" if r["vs_one_interpreter"] else "-"
            thr = f"{r['vs_threads']:.2f}x" if r["vs_threads"] else "-"
            lines.append(f"{r['model']:<10}{r['mode']:<14}{r['size']:>3}{_fmt_rate(r['median']):>11}{spread:>18}"
                         f"{one:>12}{thr:>11}")
    mem = results.get("memory")
    if mem:
        lines.append("")
        host = mem["host_with_torch"]
        lines.append(f"memory: host with torch {host['rss_mb']:.0f} MB RSS, {host['uss_mb']:.0f} MB private")
        for i, step in enumerate(mem["per_interpreter"], 1):
            lines.append(f"  + interpreter {i} with torch: +{step['rss_mb']:.0f} MB RSS, +{step['uss_mb']:.0f} MB "
                         f"private (+{step.get('private_dirty_mb', float('nan')):.0f} MB private dirty; the rest of "
                         "the RSS is library text mapped again, shared)")
        procs = results.get("extras", {}).get("process_memory", {})
        if procs:
            uss = ", ".join(f"{p['uss_mb']:.0f}" for p in procs[max(procs, key=int)])
            lines.append(f"  for comparison, each spawned process (torch and the models loaded): {uss} MB private")
    st = results.get("startup")
    if st:
        lines.append("")
        lines.append(f"start-up: 1 interpreter with torch ready {st['one_ready_s']:.2f} s; 2 in parallel "
                     f"{st['two_parallel_ready_s']:.2f} s = {st['two_vs_one']:.2f}x")
        lines.append(f"  torch import inside: alone {st['torch_import_in_interpreter_s']:.2f} s wall, "
                     f"{st['torch_import_in_interpreter_cpu_s']:.2f} s CPU; 2 in parallel "
                     f"{st['torch_import_two_in_parallel_s']:.2f} s wall, "
                     f"{st['torch_import_two_in_parallel_cpu_s']:.2f} s CPU each; in a plain process "
                     f"{st['torch_import_in_host_s']:.2f} s")
    rt = results.get("round_trip")
    if rt:
        lines.append("")
        for key, label in (("interpreter_call", "interpreter, owner thread"),
                           ("interpreter_submit", "interpreter, submit().result()"),
                           ("threads_submit", "threads backend, submit().result()"),
                           ("stdlib_thread_pool_submit", "stdlib ThreadPoolExecutor, submit().result()")):
            p = rt[key]
            lines.append(f"round trip {label:<45} median {p['median_us']:7.1f} us   p99 {p['p99_us']:7.1f} us"
                         f"   ({p['calls']:,} calls)")
    targets = results.get("targets", [])
    if targets:
        lines.append("")
        lines.append(f"{'target':<58}{'value':>10}{'limit':>12}  result")
        for t in targets:
            value = "-" if t["value"] is None else f"{t['value']:.2f}"
            verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
            lines.append(f"{t['target']:<58}{value:>10}{t['op'] + ' ' + format(t['limit'], 'g') + ' ' + t['unit']:>12}"
                         f"  {verdict}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars of inferences/s per mode and size for every model, labelled with ratios; targets below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["meta"]["models"]
    sizes = results["meta"]["sizes"]
    index = {(r["model"], r["mode"], r["size"]): r for r in results.get("throughput", [])}
    fig = plt.figure(figsize=(max(12, 6 * len(models)), 10))
    grid = fig.add_gridspec(2, len(models), height_ratios=[3, 1.7])
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(sizes)
    for col, name in enumerate(models):
        ax = fig.add_subplot(grid[0, col])
        for j, size in enumerate(sizes):
            xs, heights, lows, highs, labels = [], [], [], [], []
            for i, mode in enumerate(MODES):
                r = index.get((name, mode, size))
                if r is None:
                    continue
                xs.append(i + (j - (len(sizes) - 1) / 2) * width)
                heights.append(r["median"])
                lows.append(r["median"] - min(r["runs"]))
                highs.append(max(r["runs"]) - r["median"])
                labels.append(f"{_fmt_rate(r['median'])}\n{r['vs_one_interpreter']:.2f}x")
            bars = ax.bar(xs, heights, width, yerr=[lows, highs], capsize=3, color=colors[j % 10], label=f"N = {size}")
            ax.bar_label(bars, labels=labels, fontsize=8, padding=2)
        ax.set_xticks(range(len(MODES)), [MODE_LABELS[m].replace(", ", ",\n").replace(" (", "\n(") for m in MODES],
                      fontsize=8)
        ax.set_ylabel("inferences / s (all workers)")
        ax.set_title(f"{name}: {runtime_models.MODELS[name]}", fontsize=9, wrap=True)
        ax.margins(y=0.25)
        ax.legend(fontsize=8, loc="upper right")
        ax.text(0.01, 0.98, "label: inf/s, x one interpreter", transform=ax.transAxes, fontsize=7, va="top",
                color="gray")
    ax = fig.add_subplot(grid[1, :])
    ax.axis("off")
    cells, cell_colors = [], []
    for t in results.get("targets", []):
        verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        value = "-" if t["value"] is None else f"{t['value']:.2f} {t['unit']}"
        cells.append([t["target"], value, f"{t['op']} {t['limit']:g} {t['unit']}", verdict])
        shade = "#d9f2d9" if t["pass"] else ("#f8d7d7" if t["pass"] is False else "#eeeeee")
        cell_colors.append(["white", "white", "white", shade])
    if cells:
        table = ax.table(cellText=cells, colLabels=["target", "measured", "limit", ""],
                         cellColours=cell_colors, loc="upper center", colWidths=[0.5, 0.15, 0.15, 0.08])
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        table.scale(1, 1.4)
        for (row, col), cell in table.get_celld().items():
            if col == 0 and row > 0:
                cell.set_text_props(ha="left")
                cell.PAD = 0.02
    meta = results["meta"]
    fig.suptitle(
        f"tenfold bench runtime - {meta['when']} - {meta['cpus']} cpus, load avg {meta['loadavg_before'][0]:.2f}"
        f" - {meta['seconds']} s x {meta['reps']} reps, median (bars: min..max)"
        f"{' - QUICK' if meta['quick'] else ''}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run ------------------------------------------------------------------------------------


def run_benchmark(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    """Measure everything, check the targets, write runtime.json and runtime.png under `cfg.out`."""
    # Every worker gets one intra-op thread; for the host (threads and TorchScript modes, and the
    # spawned processes, which inherit it) that must be in the environment before torch is imported.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "meta": {
            "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "loadavg_before": list(os.getloadavg()),
            "quick": cfg.quick,
            "sizes": cfg.sizes,
            "models": cfg.models,
            "model_descriptions": {m: runtime_models.MODELS[m] for m in cfg.models},
            "seconds": cfg.seconds,
            "warmup_s": cfg.warmup_s,
            "reps": cfg.reps,
            "startup_reps": cfg.startup_reps,
            "threads_per_worker": 1,
        }
    }
    phases: dict[str, float] = {}
    t0 = t = time.perf_counter()
    log("start-up and memory (fresh processes) ...")
    results["startup"], results["memory"] = measure_startup(cfg, log)
    phases["startup_memory_s"], t = time.perf_counter() - t, time.perf_counter()
    log("round trip ...")
    results["round_trip"] = measure_round_trip(cfg)
    phases["round_trip_s"], t = time.perf_counter() - t, time.perf_counter()
    log("throughput ...")
    results["throughput"], results["extras"] = measure_throughput(cfg, log)
    phases["throughput_s"] = time.perf_counter() - t
    results["meta"]["loadavg_after"] = list(os.getloadavg())
    results["meta"]["duration_s"] = time.perf_counter() - t0
    results["meta"]["phases"] = phases
    results["targets"] = evaluate_targets(results)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "runtime.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, cfg.out / "runtime.png")
    return results


def _main(argv: list[str]) -> int:
    # Entry point of the fresh processes that measure start-up and memory.
    if len(argv) == 3 and argv[0] == "startup-child":
        print(json.dumps(_startup_child([int(n) for n in argv[1].split(",")], int(argv[2]))))
        return 0
    print("usage: python -m tenfold.bench.runtime startup-child SIZE[,SIZE...] EXTRA", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
