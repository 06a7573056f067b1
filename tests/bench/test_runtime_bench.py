"""Smoke test of `tenfold bench runtime --quick`: it runs, and writes a sane JSON and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import subprocess_env

from tenfold.bench import runtime as bench_runtime

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="namespace interpreters need glibc")


def test_quick_benchmark_writes_json_and_png(tmp_path: Path) -> None:
    env = subprocess_env()
    cmd = [sys.executable, "-m", "tenfold", "bench", "runtime", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "PASS" in proc.stdout or "MISS" in proc.stdout

    results = json.loads((tmp_path / "runtime.json").read_text())
    assert results["meta"]["quick"] is True
    models, sizes = results["meta"]["models"], results["meta"]["sizes"]
    measured = {(r["model"], r["mode"], r["size"]): r for r in results["throughput"]}
    assert set(measured) == {(m, mode, n) for m in models for mode in bench_runtime.MODES for n in sizes}
    for row in measured.values():
        assert row["median"] > 0 and all(len(w) == row["size"] for w in row["per_worker"])
    assert measured[("mlp", "interpreters", 1)]["vs_one_interpreter"] == pytest.approx(1.0)

    # Every namespace interpreter (and every process) ran with the one intra-op thread it was given.
    for infos in results["extras"]["worker_info"].values():
        assert all(info["torch_threads"] == 1 and info["omp_num_threads"] == "1" for info in infos)

    for step in results["memory"]["per_interpreter"]:
        assert 20 < step["uss_mb"] < 2000 and step["rss_mb"] >= step["uss_mb"]
    startup = results["startup"]
    assert 0 < startup["one_ready_s"] < 60 and startup["two_vs_one"] > 0
    rt = results["round_trip"]
    for key in ("interpreter_call", "interpreter_submit", "threads_submit"):
        assert 0 < rt[key]["median_us"] <= rt[key]["p99_us"]

    names = {t["target"] for t in results["targets"]}
    assert {"mlp: 2 interpreters vs 1", "mlp: 2 interpreters vs 2 threads", "round trip, owner thread (median)",
            "1 interpreter with torch ready", "2 in parallel vs 1"} <= names
    assert all(t["pass"] in (True, False) for t in results["targets"])

    png = (tmp_path / "runtime.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 800 and height >= 600
