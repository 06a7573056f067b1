"""`tenfold bench serve`, one short run on the Python-heavy example: the figures it writes agree with one
another and with the load it applied, and lie in plausible ranges."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, subprocess_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="namespace interpreters need glibc")

ROUNDS, SECONDS, CONCURRENCY = 2, 1.0, 4


def test_one_run_compares_tenfold_with_plain_replicas(tmp_path: Path) -> None:
    env = subprocess_env()  # its own local Ray, as a user's run has
    cmd = [sys.executable, "-m", "tenfold", "bench", "serve", "--models", "rnn_tagger", "--setups", "tenfold,plain",
           "--rounds", str(ROUNDS), "--seconds", str(SECONDS), "--warmup-s", "0.5", "--concurrency",
           str(CONCURRENCY), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "serve.json").read_text())
    assert (report["rounds"], report["seconds_per_round"], report["concurrency"]) == (ROUNDS, SECONDS, CONCURRENCY)
    rows = {r["setup"]: r for r in report["results"]}
    assert set(rows) == {"tenfold", "plain"}
    assert rows["tenfold"]["processes"] == 1 and rows["plain"]["processes"] == 2
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
        # Memory of the set-up's replica processes: torch and the model, once per process.
        assert 150 * row["processes"] < row["pss_mb"] < 2000 * row["processes"], row
        # CPU per request: the replicas ran the model (an RNN over a sentence costs well over 0.5 ms of CPU),
        # Serve's proxy forwarded the request; neither can exceed the 2 cores of a set-up for a whole request.
        assert 0.5 < row["replicas_cpu_ms_per_request"] < 2 * row["mean_ms"] + 50, row
        assert 0 < row["proxy_cpu_ms_per_request"] < 2 * row["mean_ms"] + 50, row
    ratio = report["ratios"]["rnn_tagger"]
    by_round = [t / p for t, p in zip(rows["tenfold"]["rounds_rps"], rows["plain"]["rounds_rps"])]
    assert ratio["throughput_vs_plain_by_round"] == pytest.approx(by_round)
    assert min(by_round) <= ratio["throughput_vs_plain"] <= max(by_round)
    assert f"tenfold/plain throughput {ratio['throughput_vs_plain']:.2f}x" in proc.stdout
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "serve.png").stat().st_size > 10_000
