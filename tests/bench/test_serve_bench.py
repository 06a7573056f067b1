"""`tenfold bench serve`, one short run on the Python-heavy example: the figures it writes agree with one
another and with the load it applied, and lie in plausible ranges."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
from support import ROOT, subprocess_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="namespace interpreters need glibc")

ROUNDS, SECONDS, CONCURRENCY = 2, 1.0, 4


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-serve")
    env = subprocess_env()  # its own local Ray, as a user's run has
    cmd = [sys.executable, "-m", "tenfold", "bench", "serve", "--models", "rnn_tagger", "--cost-models", "rnn_tagger",
           "--sizes", "2", "--setups", "tenfold,plain-mmap", "--rounds", str(ROUNDS), "--seconds", str(SECONDS),
           "--warmup-s", "0.5", "--concurrency", str(CONCURRENCY), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "serve.png").read_bytes()[:4] == b"\x89PNG" and (out / "serve.png").stat().st_size > 10_000
    return {**json.loads((out / "serve.json").read_text()), "stdout": proc.stdout}


def test_cost_rows_measure_each_set_up_alone_with_a_breakdown_that_adds_up(report: dict) -> None:
    rows = {(r["setup"], r["size"]): r for r in report["cost"]["results"]}
    assert set(rows) == {("plain-mmap", 1), ("tenfold", 2), ("plain-mmap", 2)}
    assert [rows[k]["processes"] for k in sorted(rows)] == [1, 2, 1]  # plain N=1, plain N=2, tenfold
    for (setup, _), row in rows.items():
        # A replica with torch and the model adds at least 150 MB to the machine, and no set-up here 3 GB.
        assert 150 < row["memory_mb"] < 3000, row
        # The breakdown is the same delta, per kind of process (entries under 1 MB left out).
        assert sum(row["breakdown_mb"].values()) == pytest.approx(row["memory_mb"], abs=30), row
        replica = row["breakdown_mb"].get(f"ServeReplica:{setup}:{setup}", 0)
        assert replica > 150 * row["processes"] / (2 if setup == "tenfold" else 1), row
        assert 0 < row["ready_s"] < 300 and 0 < row["scale_up_s"] < 300, row
    # Two plain processes cost more than one: at least torch again.
    assert rows[("plain-mmap", 2)]["memory_mb"] > rows[("plain-mmap", 1)]["memory_mb"] + 100


def test_cost_ratios_are_the_ratios_of_the_rows(report: dict) -> None:
    rows = {(r["setup"], r["size"]): r for r in report["cost"]["results"]}
    (ratio,) = report["cost"]["ratios"]
    tenfold, plain, one = rows[("tenfold", 2)], rows[("plain-mmap", 2)], rows[("plain-mmap", 1)]
    assert ratio["memory_vs_plain-mmap"] == pytest.approx(tenfold["memory_mb"] / plain["memory_mb"])
    assert ratio["ready_vs_one_plain_replica"] == pytest.approx(tenfold["ready_s"] / one["ready_s"])
    assert f"{ratio['memory_vs_plain-mmap']:.2f}x the memory of plain-mmap" in report["stdout"]


def test_speed_rounds_agree_with_the_closed_loop_they_applied(report: dict) -> None:
    speed = report["speed"]
    assert (speed["rounds"], speed["seconds_per_round"], speed["concurrency"]) == (ROUNDS, SECONDS, CONCURRENCY)
    rows = {r["setup"]: r for r in speed["results"]}
    assert set(rows) == {"tenfold", "plain-mmap"}
    assert rows["tenfold"]["processes"] == 1 and rows["plain-mmap"]["processes"] == 2
    for setup, row in rows.items():
        assert row["errors"] == 0 and len(row["rounds_rps"]) == ROUNDS, row
        # Rounds of equal length: the overall throughput is the mean of the rounds'.
        assert row["throughput_rps"] == pytest.approx(statistics.fmean(row["rounds_rps"]))
        assert row["requests"] >= 10, row  # enough answers for a median and a p99 to mean something
        # A closed loop of CONCURRENCY clients: requests in flight (throughput x mean latency) at most that many,
        # and not far below (the clients' own time between requests is small next to a model call).
        in_flight = row["throughput_rps"] * row["mean_ms"] / 1000
        assert 0.5 * CONCURRENCY <= in_flight <= CONCURRENCY * 1.05, (setup, in_flight, row)
        assert row["p50_ms"] <= row["p99_ms"] and row["p50_ms"] <= 2 * row["mean_ms"]
        # CPU per request: the replicas ran the model (an RNN over a sentence costs well over 0.5 ms of CPU),
        # Serve's proxy forwarded the request; neither can exceed the 2 cores of a set-up for a whole request.
        assert 0.5 < row["replicas_cpu_ms_per_request"] < 2 * row["mean_ms"] + 50, row
        assert 0 < row["proxy_cpu_ms_per_request"] < 2 * row["mean_ms"] + 50, row
    ratio = speed["ratios"]["rnn_tagger"]
    by_round = [t / p for t, p in zip(rows["tenfold"]["rounds_rps"], rows["plain-mmap"]["rounds_rps"])]
    assert ratio["throughput_vs_plain_by_round"] == pytest.approx(by_round)
    assert min(by_round) <= ratio["throughput_vs_plain"] <= max(by_round)
    assert ratio["p99_vs_plain"] == pytest.approx(rows["tenfold"]["p99_ms"] / rows["plain-mmap"]["p99_ms"])
    assert f"tenfold/plain-mmap throughput {ratio['throughput_vs_plain']:.2f}x" in report["stdout"]
