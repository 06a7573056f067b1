"""`tenfold bench soak`: its command, the leak bound it judges by, and a short soak of a real replica."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from testmodels import reliability_models as models

from tenfold.bench import soak
from tenfold.integration import codec

KIB = 1024
#: What a call that kept its futures and result alive cost: the leak the bound was set to catch.
KNOWN_LEAK_PER_REQUEST = 7 * KIB


def report_with(growth_per_request: float, *, requests: int = 2000, warmup: int = 750, every: int = 250,
                noise: int = 0) -> soak.SoakReport:
    """A report whose RSS grows by `growth_per_request` from its first sample, plus `noise` bytes up and down."""
    samples = [
        soak.Sample(requests=n, elapsed_s=n / 100, rss_bytes=int(500e6 + growth_per_request * n + noise * (-1) ** i),
                    p50_ms=1.0, p99_ms=2.0, errors=0, requests_per_s=100.0)
        for i, n in enumerate(range(every, requests + 1, every))
    ]
    return soak.SoakReport(url="http://127.0.0.1:9/", requests=requests, concurrency=4, sample_every=every,
                           warmup_requests=warmup, duration_s=requests / 100, errors=0, p50_ms=1.0, p99_ms=2.0,
                           samples=samples)


def test_bench_soak_is_a_tenfold_command_with_bounded_parameters() -> None:
    from tenfold.cli import build_parser

    args = build_parser().parse_args(["bench", "soak", "--requests", "5000", "--concurrency", "3",
                                      "--sample-every", "500"])
    assert (args.requests, args.concurrency, args.sample_every, args.interpreters) == (5000, 3, 500, 2)
    with pytest.raises(ValueError, match="at least 1"):
        soak.run_soak("http://127.0.0.1:9/", soak.bodies_for([np.zeros((1, 4), np.float32)], ["x"]), requests=10,
                      concurrency=0, sample_every=5, rss=lambda: 0)


@pytest.mark.parametrize("leak", [2 * KIB, KNOWN_LEAK_PER_REQUEST])
def test_growth_is_measured_after_the_warm_up_and_a_leak_of_a_few_kib_per_request_fails(leak: int) -> None:
    flat = report_with(0, noise=64 * KIB)
    assert abs(flat.growth_per_request) < soak.MAX_GROWTH_PER_REQUEST and flat.ok
    leaking = report_with(leak, noise=64 * KIB)
    assert leaking.growth_per_request == pytest.approx(leak, rel=0.1)
    assert not leaking.ok and "FAILED" in leaking.table()
    # Growth during the warm-up (imports, caches, the allocator's first arenas) is not held against it.
    warming = report_with(0)
    warming.samples[:2] = [dataclasses.replace(s, rss_bytes=s.rss_bytes - 50_000_000) for s in warming.samples[:2]]
    assert warming.growth_per_request == 0 and warming.ok
    assert not dataclasses.replace(warming, errors=1).ok


@pytest.fixture(scope="module")
def healthy_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tenfold.packaging import save

    path = tmp_path_factory.mktemp("soak") / "healthy.pt"
    save(models.Healthy, path, example_inputs=models.example_inputs(), name="healthy")
    return path


@pytest.fixture
def soak_app(serve_session, healthy_archive: Path) -> Iterator[str]:  # noqa: ANN001
    from ray import serve

    from tenfold.integration import app_builder
    from tenfold.packaging import archive_sha256

    # Pinned and required: the trusted path deploys.
    args = {"archive": str(healthy_archive), "name": "soak", "interpreters": 2, "num_cpus": 0.5,
            "sha256": archive_sha256(healthy_archive), "require_sha256": True}
    serve.run(app_builder(args), name="soak", route_prefix="/soak")
    try:
        yield f"{serve_session.url}/soak"
    finally:
        serve.delete("soak")


@pytest.mark.ray
def test_short_soak_has_no_errors_and_no_growth_per_request_after_warm_up(soak_app: str, tmp_path: Path) -> None:
    from tenfold.bench import common

    url = soak_app
    pid = soak.replica_pid(url)
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    bodies = soak.with_references(url, soak.bodies_for([x], ["x"]))
    np.testing.assert_allclose(np.array(json.loads(bodies[0].expected)["outputs"][0]), models.expected(x.tolist()),
                               rtol=1e-5)
    np.testing.assert_allclose(next(iter(codec.decode_arrow_outputs(bodies[1].expected).values())),
                               models.expected(x.tolist()), rtol=1e-5)
    report = soak.run_soak(url, bodies, requests=2000, concurrency=4, sample_every=250, warmup_requests=750,
                           rss=lambda: common.rss_bytes(pid))
    print("\n" + report.table())
    json_path, png_path = common.write_report(tmp_path, "soak", report.as_dict(), report.plot)
    assert json.loads(json_path.read_text())["growth_per_request_bytes"] == report.growth_per_request
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    assert report.errors == 0, report.error_examples
    assert [s.requests for s in report.samples] == list(range(250, 2001, 250))
    assert report.samples[-1].requests - report.warmup_requests >= 1000  # enough requests to see KiB per request
    assert abs(report.growth_per_request) < soak.MAX_GROWTH_PER_REQUEST, report.table()
    assert report.ok
    # The same run with the known leak added would have failed: this run's noise cannot hide it.
    leaking = dataclasses.replace(report, samples=[
        dataclasses.replace(s, rss_bytes=s.rss_bytes + KNOWN_LEAK_PER_REQUEST * s.requests) for s in report.samples])
    assert not leaking.ok, leaking.table()
    assert requests.get(f"{url}/-/stats", timeout=30).json()["pid"] == pid  # one replica served it all
