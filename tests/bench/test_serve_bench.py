"""Smoke test of `tenfold bench serve`: one short round on the Python-heavy example writes a sane JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, subprocess_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="namespace interpreters need glibc")


def test_one_round_compares_tenfold_with_plain_replicas(tmp_path: Path) -> None:
    env = subprocess_env()  # its own local Ray, as a user's run has
    cmd = [sys.executable, "-m", "tenfold", "bench", "serve", "--models", "rnn_tagger", "--setups", "tenfold,plain",
           "--rounds", "2", "--seconds", "1", "--warmup-s", "0.5", "--concurrency", "4", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tenfold/plain throughput" in proc.stdout

    report = json.loads((tmp_path / "serve.json").read_text())
    rows = {r["setup"]: r for r in report["results"]}
    assert set(rows) == {"tenfold", "plain"}
    assert rows["tenfold"]["processes"] == 1 and rows["plain"]["processes"] == 2
    for row in rows.values():
        assert row["errors"] == 0 and row["requests"] > 0 and len(row["rounds_rps"]) == 2
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert 100 < row["pss_mb"] < 5000
        # CPU per request of the replicas (their model work at least) and of Serve's HTTP proxy.
        assert 0.5 < row["replicas_cpu_ms_per_request"] < 1000 and 0 < row["proxy_cpu_ms_per_request"] < 1000
    ratio = report["ratios"]["rnn_tagger"]
    tenfold, plain = rows["tenfold"]["throughput_rps"], rows["plain"]["throughput_rps"]
    assert ratio["throughput_vs_plain"] == pytest.approx(tenfold / plain)
    assert len(ratio["throughput_vs_plain_by_round"]) == 2
    assert (tmp_path / "serve.png").stat().st_size > 10_000
