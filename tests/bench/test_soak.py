"""`tenfold bench soak`: its command, the leak bounds it judges by, short soaks of real replicas (a tensor model and
the embedder, strings in), and one of a model that leaks 1 KiB per request, which must fail."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from testmodels import reliability_models as models

from tenfold.bench import common, soak
from tenfold.integration import codec

KIB = 1024


def report_with(*, rss: float = 0, heap: float = 0, blocks: float = 0, host: float = 0, requests: int = 2000,
                warmup: int = 500, every: int = 100, noise: int = 0) -> soak.SoakReport:
    """A report whose figures grow by `rss`, `heap` and `host` bytes and `blocks` blocks per request from the first
    sample, with `noise` bytes (and blocks / 1000) up and down from one sample to the next."""
    samples = [
        soak.Sample(requests=n, elapsed_s=n / 100, rss_bytes=int(500e6 + rss * n + noise * (-1) ** i),
                    heap_bytes=int(200e6 + heap * n + noise * (-1) ** i),
                    python_blocks=int(1e6 + blocks * n + noise // 1000 * (-1) ** i),
                    host_heap_bytes=int(100e6 + host * n + noise * (-1) ** i),
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


@pytest.mark.parametrize(("figure", "leak", "bar"), [
    ("heap", KIB, "heap"), ("blocks", 1, "Python blocks"), ("host", 8 * KIB, "host heap"), ("rss", 8 * KIB, "RSS")])
def test_each_figure_is_fitted_over_the_samples_and_a_leak_past_its_bar_fails(figure: str, leak: float,
                                                                               bar: str) -> None:
    flat = report_with(noise=64 * KIB)
    assert flat.ok and abs(flat.heap_growth_per_request) < 64 and abs(flat.growth_per_request) < 64
    leaking = report_with(**{figure: leak}, noise=64 * KIB)
    fitted = {"heap": leaking.heap_growth_per_request, "blocks": leaking.blocks_per_request,
              "host": leaking.host_heap_growth_per_request, "rss": leaking.growth_per_request}[figure]
    assert fitted == pytest.approx(leak, rel=0.1)
    assert not leaking.ok and [v for v, met in leaking.verdicts.items() if not met] == [
        next(v for v in leaking.verdicts if v.startswith(bar))]
    assert f"FAILED: {bar}" in leaking.table()
    assert json.loads(json.dumps(leaking.as_dict()))["ok"] is False


def test_rss_and_the_host_are_held_to_looser_bars_and_the_warm_up_is_not_held_against_a_run() -> None:
    # The allocators' free memory moves RSS, and requests in flight the host's heap, by more than a small leak.
    assert report_with(rss=KIB, host=KIB).ok
    warming = report_with()
    warming.samples[:4] = [soak.Sample(**{**vars(s), "rss_bytes": s.rss_bytes - 50_000_000,
                                           "heap_bytes": s.heap_bytes - 20_000_000,
                                           "host_heap_bytes": s.host_heap_bytes - 9_000_000})
                           for s in warming.samples[:4]]
    fits = [warming.growth_per_request, warming.heap_growth_per_request, warming.host_heap_growth_per_request]
    assert fits == pytest.approx([0, 0, 0], abs=1e-6) and warming.ok
    warming.errors = 1
    assert not warming.ok and "FAILED: no errors" in warming.table()


@pytest.fixture(scope="module")
def tensor_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tenfold.packaging import save

    out = tmp_path_factory.mktemp("soak")
    paths = {name: out / f"{name}.pt" for name in ("healthy", "leaky")}
    for name, cls in (("healthy", models.Healthy), ("leaky", models.Leaky)):
        save(cls, paths[name], example_inputs=models.example_inputs(), name=name)
    return paths


@pytest.fixture
def soak_of(serve_session, tmp_path: Path) -> Iterator[Callable[..., soak.SoakReport]]:  # noqa: ANN001
    """soak_of(archive, name, bodies, requests, warmup) deploys `archive` (2 interpreters, one replica), soaks it with
    `bodies` (their reference answers taken first) and gives the report, whose files it also writes."""
    from ray import serve

    from tenfold.integration import app_builder
    from tenfold.packaging import archive_sha256

    names = []

    def run(archive: Path, name: str, bodies: list[common.Body], requests_: int, warmup: int = 400) -> soak.SoakReport:
        # Pinned and required: the trusted path deploys. Health checks each second: the memory samples.
        args = {"archive": str(archive), "name": name, "interpreters": 2, "num_cpus": 0.5,
                "sha256": archive_sha256(archive), "require_sha256": True, "health_check_period_s": 1.0}
        names.append(name)
        serve.run(app_builder(args), name=name, route_prefix=f"/{name}")
        url = f"{serve_session.url}/{name}"
        pid = soak.replica_pid(url)
        report = soak.run_soak(url, soak.with_references(url, bodies), requests=requests_, concurrency=4,
                               sample_every=100, warmup_requests=warmup, rss=lambda: common.rss_bytes(pid),
                               memory=lambda: soak.replica_memory(url))
        print("\n" + report.table())
        json_path, png_path = common.write_report(tmp_path, name, report.as_dict(), report.plot)
        assert json.loads(json_path.read_text())["heap_growth_per_request_bytes"] == report.heap_growth_per_request
        assert png_path.read_bytes()[:4] == b"\x89PNG"
        assert requests.get(f"{url}/-/stats", timeout=30).json()["pid"] == pid  # one replica served it all
        # Every sample after the warm-up has the replica's measures (its health checks ran all along).
        measured = [s.heap_bytes > 0 and s.python_blocks > 0 for s in report.samples if s.requests >= warmup]
        assert all(measured), report.table()
        return report

    try:
        yield run
    finally:
        for name in names:
            serve.delete(name)


def tensor_bodies() -> list[common.Body]:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    return soak.bodies_for([x], ["x"])


@pytest.mark.ray
def test_a_short_soak_of_a_tensor_model_has_no_errors_and_no_growth_per_request(
        soak_of: Callable[..., soak.SoakReport], tensor_archives: dict[str, Path]) -> None:
    bodies = tensor_bodies()
    report = soak_of(tensor_archives["healthy"], "soak-tensor", bodies, 1500)
    # Every answer was checked against these references, and they are the model's own answers.
    answers, x = soak.with_references(report.url, bodies), json.loads(bodies[0].data)["inputs"][0]
    np.testing.assert_allclose(np.array(json.loads(answers[0].expected)["outputs"][0]), models.expected(x), rtol=1e-5)
    np.testing.assert_allclose(next(iter(codec.decode_arrow_outputs(answers[1].expected).values())),
                               models.expected(x), rtol=1e-5)
    assert report.errors == 0, report.error_examples
    assert [s.requests for s in report.samples] == list(range(100, 1501, 100))
    assert report.ok, report.table()


@pytest.mark.ray
def test_a_short_soak_of_the_embedder_with_strings_in_has_no_growth_per_request(
        soak_of: Callable[..., soak.SoakReport], minilm_archive: Path) -> None:
    texts = [["Several interpreters share one process."], ["ünïcode ✓", "Fresh bread and cinnamon."]]
    bodies = [common.Body(codec.JSON_TYPE, json.dumps({"inputs": [t]}).encode()) for t in texts]
    # torch's caches fill over the first few hundred calls of each interpreter: a longer warm-up.
    report = soak_of(minilm_archive, "soak-strings", bodies, 1600, warmup=900)
    assert report.errors == 0, report.error_examples
    assert report.ok, report.table()


@pytest.mark.ray
def test_a_model_that_leaks_1_kib_per_request_fails_the_soak(soak_of: Callable[..., soak.SoakReport],
                                                              tensor_archives: dict[str, Path]) -> None:
    report = soak_of(tensor_archives["leaky"], "soak-leaky", tensor_bodies(), 1000)
    assert report.errors == 0, report.error_examples
    assert not report.ok, report.table()
    # Caught by what the interpreters hold: a block and about 1 KiB of heap per request.
    assert report.blocks_per_request == pytest.approx(1.0, abs=0.4), report.table()  # about one: the fit is noisy
    assert report.heap_growth_per_request == pytest.approx(models.LEAK_BYTES, rel=0.25), report.table()
