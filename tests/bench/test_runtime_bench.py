"""`tenfold bench runtime --quick`: it runs, and the figures it writes are consistent with one another,
within plausible ranges, and judged against the targets as the targets say."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from support import subprocess_env

from tenfold.bench import runtime as bench_runtime

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="namespace interpreters need glibc")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One quick run: its JSON report, what it printed, and its output folder."""
    out = tmp_path_factory.mktemp("bench-runtime")
    cmd = [sys.executable, "-m", "tenfold", "bench", "runtime", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "runtime.json").read_text()), proc.stdout, out


def test_every_model_mode_and_size_is_measured_and_its_median_and_ratios_follow_from_its_runs(run) -> None:
    results, _, _ = run
    meta = results["meta"]
    assert meta["quick"] is True
    rows = {(r["model"], r["mode"], r["size"]): r for r in results["throughput"]}
    assert set(rows) == {(m, mode, n) for m in meta["models"] for mode in bench_runtime.MODES for n in meta["sizes"]}
    for (model, _, size), row in rows.items():
        assert len(row["runs"]) == len(row["per_worker"]) == meta["reps"]
        for rate, per_worker in zip(row["runs"], row["per_worker"]):
            # Every worker of the run did work, and the run's rate is the sum of theirs.
            assert len(per_worker) == size and all(r > 0 for r in per_worker), per_worker
            assert rate == pytest.approx(sum(per_worker))
        assert row["median"] == pytest.approx(statistics.median(row["runs"]))
        one = rows[(model, "interpreters", 1)]["median"]
        threads = rows[(model, "threads", size)]["median"]
        assert row["vs_one_interpreter"] == pytest.approx(row["median"] / one)
        assert row["vs_threads"] == pytest.approx(row["median"] / threads)


def test_each_worker_ran_with_the_one_intra_op_thread_it_was_given(run) -> None:
    results, _, _ = run
    meta = results["meta"]
    infos = results["extras"]["worker_info"]
    assert set(infos) == {f"{mode}@{n}" for mode in bench_runtime.MODES for n in meta["sizes"]}
    for key, workers in infos.items():
        assert workers, key
        assert all(w["torch_threads"] == 1 and w["omp_num_threads"] == "1" for w in workers), (key, workers)


def test_memory_and_start_up_figures_are_plausible_and_consistent(run) -> None:
    results, _, _ = run
    memory, startup = results["memory"], results["startup"]
    host = memory["host_with_torch"]
    assert 100 < host["rss_mb"] < 4000 and 0 < host["uss_mb"] <= host["rss_mb"]
    assert memory["per_interpreter"], memory
    for step in memory["per_interpreter"]:
        # An interpreter with torch imported adds tens to hundreds of MB of its own, never a whole host's RSS
        # of shared library text again as private memory.
        assert 20 < step["uss_mb"] < 1000 and step["uss_mb"] <= step["rss_mb"] < 2000, step
    assert startup["one_ready_s"] == pytest.approx(statistics.median(startup["one_runs_s"]))
    assert startup["two_parallel_ready_s"] == pytest.approx(statistics.median(startup["two_runs_s"]))
    assert startup["two_vs_one"] == pytest.approx(startup["two_parallel_ready_s"] / startup["one_ready_s"])
    # Ready means torch imported inside: never faster than that import.
    assert startup["one_ready_s"] >= startup["torch_import_in_interpreter_s"] > 0


def test_round_trips_count_the_calls_asked_for_and_their_percentiles_are_ordered(run) -> None:
    results, _, _ = run
    rt = results["round_trip"]
    for key in ("interpreter_call", "interpreter_submit", "threads_submit", "stdlib_thread_pool_submit"):
        p = rt[key]
        assert p["calls"] == 2_000, (key, p)  # --quick's round_trips
        assert 0 < p["median_us"] <= p["p99_us"] and p["mean_us"] > 0, (key, p)
    # The bare call on the owner thread is a part of submit().result(), which adds the hand-off.
    assert rt["interpreter_call"]["median_us"] < rt["interpreter_submit"]["median_us"]


def test_targets_carry_the_figures_they_judge_and_pass_exactly_when_the_value_meets_the_limit(run) -> None:
    results, out, _ = run
    rows = {(r["model"], r["mode"], r["size"]): r for r in results["throughput"]}
    targets = {t["target"]: t for t in results["targets"]}
    judged = {
        "mlp: 2 interpreters vs 1": rows[("mlp", "interpreters", 2)]["vs_one_interpreter"],
        "mlp: 2 interpreters vs 2 threads": rows[("mlp", "interpreters", 2)]["vs_threads"],
        "round trip, owner thread (median)": results["round_trip"]["interpreter_call"]["median_us"],
        "round trip, submit().result() (median)": results["round_trip"]["interpreter_submit"]["median_us"],
        "1 interpreter with torch ready": results["startup"]["one_ready_s"],
        "2 in parallel vs 1": results["startup"]["two_vs_one"],
        "private memory per interpreter with torch (worst step)":
            max(s["uss_mb"] for s in results["memory"]["per_interpreter"]),
    }
    assert set(judged) <= set(targets)
    for name, value in judged.items():
        assert targets[name]["value"] == pytest.approx(value), name
    for t in targets.values():
        assert t["op"] in (">=", "<=") and t["limit"] > 0
        assert t["pass"] is (t["value"] >= t["limit"] if t["op"] == ">=" else t["value"] <= t["limit"]), t
        verdict = "PASS" if t["pass"] else "MISS"
        printed = [line for line in out.splitlines() if line.startswith(t["target"])]
        assert len(printed) == 1 and printed[0].endswith(verdict), (t, printed)


def test_the_plot_is_a_png_of_a_readable_size(run) -> None:
    _, _, folder = run
    png = (folder / "runtime.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 800 and height >= 600
