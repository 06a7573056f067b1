"""replicate(): one archive in every interpreter of a real pool, weights shared from one host buffer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from testmodels.packaging_models import (
    AlwaysWrites,
    Big,
    WritesOnLargeInput,
    fails_on_purpose,
    grad_enabled_and_sum,
    run_model,
    small,
    weight_addresses,
)

import tenfold.packaging as tp
from tenfold.bench.packaging import measure_in_subprocess
from tenfold.packaging import replicated
from tenfold.runtime import InterpreterPool, remote_traceback

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def pool() -> Iterator[InterpreterPool]:
    with InterpreterPool(2, threads_per_interpreter=1) as p:
        yield p


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "small.pt"
    tp.save(small, path, example_inputs=(X,))
    return path


def test_replicated_model_matches_the_original_in_every_interpreter(pool: InterpreterPool, archive: Path) -> None:
    want = small()(X)
    with tp.replicate(pool, archive) as model:
        assert model.manifest == tp.read_manifest(archive)
        results = model.broadcast(run_model, X)
        assert len(results) == 2 and all(torch.equal(r, want) for r in results)
        futures = [model.submit(X) for _ in range(6)]
        assert all(isinstance(f, Future) for f in futures)
        assert all(torch.equal(f.result(timeout=60), want) for f in futures)
        torch.testing.assert_close(model(X[:1]), small()(X[:1]))  # the batch dimension is dynamic


def test_apply_runs_a_function_of_the_model_next_to_it(pool: InterpreterPool, archive: Path) -> None:
    with tp.replicate(pool, archive) as model:
        answers = [model.apply(grad_enabled_and_sum, X).result(timeout=60) for _ in range(4)]
        assert all(grad is False for grad, _ in answers), "apply runs under torch.no_grad"
        torch.testing.assert_close(answers[0][1], small()(X).sum(dim=1))
        with pytest.raises(KeyError, match="on purpose") as info:
            model.apply(fails_on_purpose, "on purpose").result(timeout=60)
        assert "fails_on_purpose" in remote_traceback(info.value)
        with pytest.raises(Exception, match="lambda"):
            model.apply(lambda m: m, X).result(timeout=60)
        torch.testing.assert_close(model(X), small()(X))  # still serving


def test_a_settled_call_is_not_kept_by_the_model(pool: InterpreterPool, archive: Path) -> None:
    import gc
    import weakref

    with tp.replicate(pool, archive) as model:
        futures = [model.submit(X) for _ in range(4)] + [model.apply(grad_enabled_and_sum, X) for _ in range(4)]
        results = [f.result(timeout=60) for f in futures]
        dropped = [weakref.ref(f) for f in futures] + [weakref.ref(r[1] if isinstance(r, tuple) else r)
                                                       for r in results]
        del futures, results
        gc.collect()
        assert [ref() for ref in dropped] == [None] * len(dropped), "the model still holds calls it finished"


def test_every_interpreter_views_the_one_host_buffer(pool: InterpreterPool, archive: Path) -> None:
    arr = np.frombuffer(archive.read_bytes(), dtype=np.uint8)
    base, size = arr.ctypes.data, arr.nbytes
    with tp.replicate(pool, arr) as model:
        per_interpreter = model.broadcast(weight_addresses)
    assert len(per_interpreter) == 2 and per_interpreter[0] == per_interpreter[1]
    for ptr, nbytes in per_interpreter[0]:
        assert base <= ptr and ptr + nbytes <= base + size


def test_inputs_are_checked_before_dispatch_where_they_can_be(pool: InterpreterPool, archive: Path) -> None:
    calls = sum(s.calls for s in pool.stats().interpreters)
    with tp.replicate(pool, archive) as model:
        loaded = sum(s.calls for s in pool.stats().interpreters)
        assert loaded > calls
        cases = [
            ((X, X), "expected 1 input"),
            ((X[0],), "input 0 ('x') has rank 1"),
            ((X.double(),), "input 0 ('x') has dtype float64"),
            ((torch.randn(3, 9),), "size 9 in dim 1"),
            ((np.zeros((3, 9), np.float32),), "size 9 in dim 1"),
        ]
        for inputs, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)) as e:
                model(*inputs)
            assert "x: float32[?, 8]" in str(e.value)
            with pytest.raises(ValueError):
                model.check_inputs(inputs)
        assert sum(s.calls for s in pool.stats().interpreters) == loaded, "nothing was dispatched"


def test_nested_lists_and_arrays_are_taken_for_tensor_inputs_in_the_interpreter(pool: InterpreterPool,
                                                                                archive: Path) -> None:
    with tp.replicate(pool, archive) as model:
        torch.testing.assert_close(model(X.tolist()), small()(X))
        torch.testing.assert_close(model(X.numpy()), small()(X))
        with pytest.raises(ValueError, match=re.escape("input 0 ('x') has shape [8], expected x: float32[?, 8]")):
            model([1.0] * 8)
        with pytest.raises(ValueError, match="must be a rectangular array of numbers, got strings"):
            model([["a"] * 8])
        torch.testing.assert_close(model(X), small()(X))  # still serving


def test_close_drops_the_model_everywhere(pool: InterpreterPool, archive: Path) -> None:
    model = tp.replicate(pool, archive)
    model_id = model._id
    assert model_id in replicated._host_buffers
    model.close()
    model.close()
    assert model_id not in replicated._host_buffers
    assert pool.broadcast(replicated._drop, model_id) == [False, False]
    with pytest.raises(RuntimeError, match="closed"):
        model(X)


def test_pin_is_checked_in_the_host(pool: InterpreterPool, archive: Path) -> None:
    tp.replicate(pool, archive, sha256=tp.archive_sha256(archive)).close()
    with pytest.raises(tp.PinMismatch, match=str(archive)):
        tp.replicate(pool, archive, sha256="f" * 64)


def test_model_writing_its_weights_needs_private_copies(pool: InterpreterPool, tmp_path: Path) -> None:
    path = tmp_path / "writes.pt"
    with pytest.warns(UserWarning):
        tp.save(AlwaysWrites(), path, example_inputs=(X,))
    with pytest.raises(tp.SharedWeightWrite, match="copy_weights=True"):
        tp.replicate(pool, path)
    with tp.replicate(pool, path, copy_weights=True) as model:
        assert model(X).shape == (3, 4)


def test_write_at_inference_is_refused_and_stops_the_model(pool: InterpreterPool, tmp_path: Path) -> None:
    path = tmp_path / "sometimes.pt"
    tp.save(WritesOnLargeInput(), path, example_inputs=(X,))
    with tp.replicate(pool, bytearray(path.read_bytes())) as model:
        model(X)
        with pytest.raises(tp.SharedWeightWrite, match="wrote into one of its weights") as e:
            model(X + 1000)
        assert "copy_weights=True" in str(e.value)
        with pytest.raises(tp.SharedWeightWrite, match="earlier call"):
            model(X)


def test_four_interpreters_share_one_copy_of_200_mb(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    tp.save(Big(200), path, example_inputs=(torch.ones(2, 3),))
    result = measure_in_subprocess(str(path), 4)
    weights = result["weight_bytes"]
    assert weights >= 200 << 20
    touched = result["delta"]["touched"]
    assert touched["rss"] < 1.25 * weights, result
    assert touched["pss"] < 1.25 * weights, result
    assert result["delta"]["ran"]["rss"] < 1.25 * weights, result


def test_replicate_on_the_threads_backend(archive: Path) -> None:
    with InterpreterPool(2, backend="threads") as threads, tp.replicate(threads, archive) as model:
        assert torch.equal(model(X), small()(X))
        assert model.submit(X).result(timeout=60).shape == (3, 4)
