"""Dynamic batching: the requests to one model joined into one call, and its answer split back, in order.

Two kinds of model take a batch. A Python-valued model that maps one list to a list of the same length, as
`(texts: list[str]) -> list[list[float]]`: the requests' lists are joined, and each request gets its own slice
of the results. A tensor model with a dynamic first dimension on every input and output: the requests' arrays are
joined along it, and each gets its rows back. The replica's host joins the requests of Serve's route and handles
(with `serve.batch`); each interpreter joins the requests of its own connections on `http_port` (`Batcher`). Both
check every request before it joins, so that a bad one fails alone.

Nothing here imports torch or Ray: the interpreters' servers use it as the host does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tenfold.packaging import ValueSpec, _signature, _values

from . import codec


class Failed:
    """A request's own error, from a batch that was run request by request (see `run_values`)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def check_items(interface: codec.Interface, items: Any) -> list[Any]:
    """A batched request's list of items, checked against the model's schema: InvalidInput naming it if it does
    not fit (checked before it joins others, so that it fails alone)."""
    (spec,) = interface.inputs
    assert isinstance(spec, ValueSpec)
    try:
        _values.validate(spec.json_schema, items, f"input 0 ({spec.name!r})", spec.type)
    except ValueError as exc:
        raise codec.InvalidInput(str(exc)) from None
    return list(items)


def check_rows(inputs: Sequence[Any]) -> int:
    """The rows of a batched tensor request: InvalidInput unless every input has the same first dimension."""
    rows: set[tuple[int, ...]] = {tuple(getattr(v, "shape", ()))[:1] for v in inputs}
    if len(rows) != 1 or rows == {()}:
        raise codec.InvalidInput("with batching, every input needs the same first (batch) dimension; "
                                 f"got shapes {[list(getattr(v, 'shape', ())) for v in inputs]}")
    (first,) = next(iter(rows))
    return int(first)


def join_values(batch: Sequence[Sequence[Any]]) -> tuple[list[Any], list[int]]:
    """The requests' items in one list, and each request's count."""
    return [item for items in batch for item in items], [len(items) for items in batch]


def split_values(results: Any, counts: Sequence[int]) -> list[list[Any]]:
    """Each request's slice of a batched model's results; TypeError unless there is one result per item."""
    total = sum(counts)
    if not isinstance(results, list) or len(results) != total:
        got = f"{len(results)} results" if isinstance(results, list) else f"a {type(results).__name__}"
        raise TypeError(f"a batched model must return one result per item: it returned {got} for {total} items")
    out, start = [], 0
    for n in counts:
        out.append(results[start:start + n])
        start += n
    return out


def join_arrays(batch: Sequence[Sequence[np.ndarray]]) -> tuple[list[np.ndarray], list[int]]:
    """The requests' arrays joined along dimension 0, input by input, and each request's rows."""
    rows = [int(request[0].shape[0]) for request in batch]
    columns = [[request[i] for request in batch] for i in range(len(batch[0]))]
    return [np.concatenate(column) if len(column) > 1 else column[0] for column in columns], rows


def split_rows(result: Any, rows: Sequence[int]) -> list[Any]:
    """Per-request slices of a batched result (a tensor or array, or a tuple/list/dict of them)."""
    bounds = np.cumsum([0, *rows])
    total = int(bounds[-1])

    def cut(value: Any, i: int) -> Any:
        if getattr(value, "shape", None) is None or not value.shape or value.shape[0] != total:
            raise ValueError(f"a batched output has shape {list(getattr(value, 'shape', []))}; its first "
                             f"dimension must be the batch's {total} rows")
        part = value[bounds[i]:bounds[i + 1]]
        # A slice would keep (and, over a handle, send) the whole batch's storage.
        return part.clone() if hasattr(part, "clone") else part.copy()

    def per_request(i: int) -> Any:
        if isinstance(result, dict):
            return {k: cut(v, i) for k, v in result.items()}
        if isinstance(result, list | tuple):
            return type(result)(cut(v, i) for v in result)
        return cut(result, i)

    return [per_request(i) for i in range(len(rows))]


def run_values(call: Callable[[list[Any]], Any], batch: Sequence[Sequence[Any]]) -> list[Any]:
    """One model call (`call(items)`) on the items of several requests, joined in order; each request's results.
    When a check past the schema (a validator of the model's types) refuses the joined items, each request is run
    alone, so that only those at fault fail (as `Failed`)."""
    joined, counts = join_values(batch)
    try:
        return split_values(call(joined), counts)
    except ValueError:
        if len(batch) == 1:
            raise
    out: list[Any] = []
    for items in batch:
        try:
            out.append(call(list(items)))
        except ValueError as exc:
            out.append(Failed(exc))
    return out


def values_batch(model: Any, interface: codec.Interface, batch: Sequence[Sequence[Any]]) -> list[Any]:
    """`run_values` in the interpreter that holds `model` (as `ReplicatedModel.apply` or the interpreter's server
    runs it): the joined items checked and converted by the model's type hints, then one call."""

    def call(items: list[Any]) -> Any:
        (prepared,) = _signature.prepare_inputs(model, interface.inputs, [items], interface.signature)
        return model(prepared)

    return run_values(call, batch)


# -- in an interpreter, on its HTTP server's loop (http_port) -------------------------------------------


class Batcher:
    """Joins the requests to one model that an interpreter's server holds at once, up to `max_size`, waiting up
    to `wait_s` for a batch to fill. `run(batch)` runs one batch on the server's thread (which does nothing else
    meanwhile: requests that arrive then wait in their sockets, and join the next batch) and returns each
    request's answer, or `Failed`."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], max_size: int, wait_s: float) -> None:
        self._run, self._max, self._wait_s = run, max_size, wait_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.last_used = time.monotonic()

    async def submit(self, request: Any) -> Any:
        """This request's answer once its batch has run."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((request, future))
        self.last_used = time.monotonic()
        if len(self._pending) >= self._max:
            self._flush_soon(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self._wait_s, self._flush)
        result = await future
        if isinstance(result, Failed):
            raise result.error
        return result

    def _flush_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_soon(self._flush)  # type: ignore[assignment]

    def _flush(self) -> None:
        self._timer = None
        batch, self._pending = self._pending[:self._max], self._pending[self._max:]
        batch = [(r, f) for r, f in batch if not f.done()]  # a request whose client went is not run
        if self._pending:
            self._flush_soon(asyncio.get_running_loop())
        if not batch:
            return
        try:
            results = self._run([r for r, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - the batch's error is each of its requests' error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
