"""Streaming models: packaged from a generator, their items pulled one at a time from the interpreter that runs
them, with errors, interrupts and closing as a caller of a generator expects."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_for
from testmodels import stream_models
from testmodels.stream_models import EXAMPLE, ended

import tenfold.packaging as tp
from tenfold.runtime import InterpreterPool, remote_traceback


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("streams") / "ticks.pt"
    tp.save(stream_models.ticks, path, example_inputs=EXAMPLE, name="ticks")
    return path


@pytest.fixture(scope="module")
def model(archive: Path) -> Iterator[tp.ReplicatedModel]:
    with InterpreterPool(2, threads_per_interpreter=1) as pool, tp.replicate(pool, archive) as m:
        yield m


def token() -> int:
    return random.randrange(1, 2**31)


def test_a_generator_is_packaged_as_a_stream_of_its_items(archive: Path) -> None:
    manifest = tp.read_manifest(archive)
    assert manifest.streams and manifest.output_structure == "stream"
    assert manifest.signature() == "(count: int, period_s: float, fail_at: int, token: int) -> Iterator[int]"
    assert manifest.outputs[0].json_schema == {"type": "integer"}  # the item's, from Iterator[int]
    loaded = tp.load(archive, verify=True)  # the reference check re-runs the stream and compares its items
    assert list(loaded(4, 0.0, -1, 0)) == [0, 1, 2, 3]


def test_a_stream_that_yields_nothing_on_its_example_or_yields_tensors_is_refused(tmp_path: Path) -> None:
    with pytest.raises(tp.PackagingFailed, match="yielded nothing on example_inputs"):
        tp.save(stream_models.ticks, tmp_path / "empty.pt", example_inputs=(0, 0.0, -1, 0))

    def tensors(n: int):  # noqa: ANN202 - no hint: the items decide
        import torch

        yield from (torch.zeros(2) for _ in range(n))

    with pytest.raises(tp.PackagingFailed, match=r"yields Python values .* not Tensor; yield item.tolist\(\)"):
        tp.save(tensors, tmp_path / "tensors.pt", example_inputs=(2,))


def test_items_come_back_in_order_and_the_stream_ends(model: tp.ReplicatedModel) -> None:
    t = token()
    assert list(model.stream(5, 0.0, -1, t)) == [0, 1, 2, 3, 4]
    assert ended(t) == "exhausted"


def test_each_item_crosses_as_it_is_yielded_from_a_stream_that_never_ends(model: tp.ReplicatedModel) -> None:
    t = token()
    with model.stream(-1, 0.001, -1, t) as stream:
        assert [stream.next().result(timeout=30) for _ in range(3)] == [(False, 0), (False, 1), (False, 2)]
        assert ended(t) is None  # still running in its interpreter, between two pulls
    wait_for(lambda: ended(t) == "closed", 10, "the generator to be closed in its interpreter", interval_s=0.02)
    assert stream.next().result(timeout=30) == (True, None)


def test_the_models_exception_ends_the_stream_after_the_items_before_it(model: tp.ReplicatedModel) -> None:
    t = token()
    got = []
    with pytest.raises(ValueError, match="tick 2 failed") as info:
        for item in model.stream(5, 0.0, 2, t):
            got.append(item)
    assert got == [0, 1]
    assert 'stream_models.py", line' in remote_traceback(info.value)  # where it was raised, in the interpreter
    assert ended(t) == "ValueError"
    assert list(model.stream(2, 0.0, -1, 0)) == [0, 1]  # and the interpreters serve on


def test_inputs_are_checked_before_the_model_runs(model: tp.ReplicatedModel) -> None:
    with pytest.raises(ValueError, match=r"expected 4 input\(s\), got 2"):
        model.stream(1, 0.0)
    with pytest.raises(ValueError, match=r"input 0 \('count'\) must be int"):
        list(model.stream("many", 0.0, -1, 0))


def test_an_interrupted_pull_stops_the_generator_and_frees_its_interpreter(model: tp.ReplicatedModel) -> None:
    t = token()
    stream = model.stream(-1, 60.0, -1, t)  # the second tick comes after a minute
    assert stream.next().result(timeout=30) == (False, 0)
    pull = stream.next()
    wait_for(lambda: model._pool.stats().interpreters[stream.interpreter].queue_depth == 1, 10,
             "the pull to run", interval_s=0.02)
    assert stream.interrupt(pull, grace_s=5.0) is True
    with pytest.raises(TimeoutError):
        pull.result(timeout=10)
    assert ended(t) == "TimeoutError"
    stream.close()
    assert list(model.stream(1, 0.0, -1, 0)) == [0]


def test_a_stream_dropped_without_close_is_closed_in_its_interpreter(model: tp.ReplicatedModel) -> None:
    import gc

    t = token()
    stream = model.stream(-1, 0.0, -1, t)
    assert stream.next().result(timeout=30) == (False, 0)
    del stream
    gc.collect()
    wait_for(lambda: ended(t) == "closed", 10, "the dropped stream to be closed", interval_s=0.02)


def test_the_text_generator_example_streams_the_same_text_as_the_original(tmp_path: Path) -> None:
    import sys

    from support import ROOT

    sys.path.insert(0, str(ROOT))
    try:
        from examples import text_generator
    finally:
        sys.path.remove(str(ROOT))
    path = tmp_path / "text_generator.pt"
    manifest = tp.save(text_generator.build, path, example_inputs=text_generator.example_inputs())
    assert manifest.signature() == "(prompt: str, max_tokens: int (>= 1, <= 1024)) -> Iterator[str]"
    want = list(text_generator.build()("Once upon a time", 24))
    assert len(want) == 24 and all(len(t) == 1 and t.isprintable() for t in want)
    with InterpreterPool(1, threads_per_interpreter=1) as pool, tp.replicate(pool, path) as model:
        assert list(model.stream("Once upon a time", 24)) == want
        assert list(model.stream("Once upon a time", 24)) == want  # the same prompt, the same text
