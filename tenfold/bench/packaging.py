"""`tenfold bench packaging`: packaging and loading times, and memory of one archive shared by a pool.

Run from the repository root (it packages examples.resnet). Memory is measured in a fresh subprocess
so that nothing else this process did is counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _warm() -> None:
    """Import what loading needs, so that the baseline includes it."""
    import torch  # noqa: F401

    import tenfold.packaging  # noqa: F401


def _inputs_for(manifest: Any) -> tuple:
    import torch

    return tuple(torch.zeros([2 if d is None else d for d in s.shape], dtype=getattr(torch, s.dtype))
                 for s in manifest.inputs)


def _plain_load(path: str) -> bool:
    """Load with plain torch.package (weights copied), for comparison; kept alive in this interpreter."""
    from torch.package import PackageImporter

    _plain_models.append(PackageImporter(path).load_pickle("model", "model.pkl"))
    return True


_plain_models: list[Any] = []


def touch_weights(model: Any) -> float:
    """Read every byte of a model's weights (so that sharing them is measured, not just mapping them)."""
    import torch

    total = 0.0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            total += float(t.sum() if t.is_floating_point() else t.double().sum())
    return total


def _call(model: Any, *inputs: Any) -> None:
    model(*inputs)


def measure_sharing(archive: str, interpreters: int, *, plain: bool = False) -> dict[str, Any]:
    """Process memory before and after `archive` is replicated into `interpreters` interpreters of one
    pool and run once in each (so every weight page is touched). Run it in a fresh process."""
    import psutil

    from tenfold.packaging import read_manifest, replicate
    from tenfold.runtime import InterpreterPool

    proc = psutil.Process()

    def mem() -> dict[str, int]:
        info = proc.memory_full_info()
        return {"rss": info.rss, "pss": info.pss, "uss": info.uss}

    manifest = read_manifest(archive)
    inputs = _inputs_for(manifest)
    points: dict[str, dict[str, int]] = {}
    with InterpreterPool(interpreters, threads_per_interpreter=1) as pool:
        pool.broadcast(_warm)
        points["warm"] = mem()
        t0 = time.perf_counter()
        if plain:
            pool.broadcast(_plain_load, archive)
            load_s = time.perf_counter() - t0
            points["loaded"] = points["touched"] = mem()
        else:
            model = replicate(pool, archive)
            load_s = time.perf_counter() - t0
            points["loaded"] = mem()
            model.broadcast(touch_weights)  # every weight page read in every interpreter
            points["touched"] = mem()
            model.broadcast(_call, *inputs)
            points["ran"] = mem()
            model.close()
    base = points["warm"]
    return {
        "interpreters": interpreters,
        "weight_bytes": manifest.weight_bytes,
        "load_s": load_s,
        "points": points,
        "delta": {p: {k: v[k] - base[k] for k in v} for p, v in points.items()},
        "plain": plain,
    }


def measure_in_subprocess(archive: str, interpreters: int, *, plain: bool = False) -> dict[str, Any]:
    code = (
        "import json, sys; from tenfold.bench.packaging import measure_sharing; "
        f"print('RESULT', json.dumps(measure_sharing({archive!r}, {interpreters}, plain={plain})))"
    )
    from tenfold.runtime import with_glibc_tunables

    env = with_glibc_tunables(os.environ)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"the measuring process failed ({run.returncode}):\n{run.stderr[-4000:]}")


def run(args: Any) -> int:
    """`tenfold bench packaging`."""
    import torch

    from tenfold.packaging import load, save

    weights_mb, interpreters = args.weights_mb, args.interpreters

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from examples import resnet
    except ImportError:
        print("tenfold bench packaging: run it from the repository root (it packages examples.resnet)")
        return 2
    mb = 1 << 20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet25m.pt"
        model = resnet.build(width=70)
        params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        manifest = save(model, path, example_inputs=resnet.example_inputs())
        save_s = time.perf_counter() - t0
        del model
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            load(path)
            loads.append(time.perf_counter() - t0)
        print(f"package {params / 1e6:.1f}M-parameter ResNet ({manifest.weight_bytes / mb:.0f} MiB): {save_s:.2f} s "
              "(target <= 5 s)")
        print(f"load it in this interpreter (torch already imported): best {min(loads):.3f} s of 3 "
              "(target <= 1 s)")
        fresh = subprocess.run(
            [sys.executable, "-c", "import time, torch; t0 = time.perf_counter(); import tenfold.packaging as tp; "
             f"tp.load({str(path)!r}); print(time.perf_counter() - t0)"],
            capture_output=True, text=True, timeout=300,
        )
        print(f"load it in a fresh process, after `import torch` (includes importing tenfold.packaging): "
              f"{float(fresh.stdout.strip() or 'nan'):.3f} s")

        big = Path(tmp) / "big.pt"
        width = round(64 * (weights_mb / 81.4) ** 0.5)  # width 64 holds 81.4 MiB of weights
        save(resnet.build(width=width), big, example_inputs=resnet.example_inputs())
        del torch
        shared = measure_in_subprocess(str(big), interpreters)
        plain = measure_in_subprocess(str(big), interpreters, plain=True)
    w = shared["weight_bytes"]
    print(f"{interpreters} interpreters, one archive of {w / mb:.0f} MiB of weights (ResNet width {width}); "
          "memory added to the process, after torch was imported in every interpreter:")

    def row(label: str, d: dict[str, int]) -> None:
        print(f"  {label:<52} +{d['rss'] / mb:6.0f} MiB RSS  +{d['pss'] / mb:6.0f} MiB PSS  ({d['rss'] / w:.2f} x)")

    row("replicate (weights mapped, not yet read)", shared["delta"]["loaded"])
    row("replicate + every weight read in every interpreter", shared["delta"]["touched"])
    row("  + one inference in each (adds compute workspace)", shared["delta"]["ran"])
    row("plain torch.package in each interpreter (copies)", plain["delta"]["loaded"])
    print(f"  load into all {interpreters}: replicate {shared['load_s']:.2f} s, plain {plain['load_s']:.2f} s; "
          f"target: < 1.25 x the weights ({1.25 * w / mb:.0f} MiB) with the weights read everywhere")
    return 0
