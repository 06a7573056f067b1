"""Streaming calls: a model whose call returns an iterator (a generator, say) runs inside one interpreter, and
the host pulls its items one call at a time, each as soon as the model has produced it.

The iterator stays in the interpreter that opened it, between the host's calls; the interpreter serves other
calls meanwhile. Every pull is an ordinary call of the pool, pinned to that interpreter (`submit_to`), so it
can be interrupted past a deadline like any other, and closing the stream closes the generator there (its
`finally` blocks run).
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from . import _signature


class StreamClosed(RuntimeError):
    """The stream is not open in its interpreter: it ended, was closed, or its interpreter was lost."""


class ModelStream:
    """The items of one streaming call, pulled from the interpreter that runs it.

    Iterate it (each step waits for the next item), or call `next()` for a Future of ``(done, item)`` and
    `close()` when done with it; it also closes itself once collected. Items come back as the model yields
    them, or encoded in the interpreter by the `encode` function given to `ReplicatedModel.open_stream`.
    """

    def __init__(self, model: Any, index: int, stream_id: str, first: Future) -> None:
        self._model = model
        self.interpreter = index
        self._id = stream_id
        self._first: Future | None = first
        self._done = False
        self._lock = threading.Lock()
        # Closed in its interpreter even if the caller forgets: the generator holds what it computed with.
        self._finalizer = weakref.finalize(self, _close_in, model, index, stream_id)

    def next(self) -> Future:
        """A Future of ``(done, item)``: the next item, or ``(True, None)`` once the iterator is exhausted.
        Call it again only once the previous Future is done. The model's exception fails the Future, and
        the stream with it."""
        with self._lock:
            first, self._first = self._first, None
        if first is not None:
            return first
        if self._done:
            done: Future = Future()
            done.set_result((True, None))
            return done
        # Run through the model's own runner (torch.no_grad, writes to shared weights caught), as a call is.
        return self._model._submit_to(self.interpreter, self._model._runner, (_pull, (self._id,)))

    def interrupt(self, future: Future, *, grace_s: float = 1.0) -> bool:
        """Stop the pull behind `future` (past a deadline, or its caller gone): see `ReplicatedModel.interrupt`."""
        return self._model.interrupt(future, grace_s=grace_s)

    @property
    def closed(self) -> bool:
        """Whether `close()` was called (or the stream collected)."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Close the iterator in its interpreter (queued behind a pull in progress). Safe to call twice."""
        self._done = True
        self._finalizer()

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                done, item = self.next().result()
                if done:
                    return
                yield item
        finally:
            self.close()

    def __enter__(self) -> ModelStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_stream(model: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                encode: Callable[[Any], Any] | None) -> ModelStream:
    """Run `fn(loaded model, *args)` in the next free interpreter of `model` (a ReplicatedModel) and keep the
    iterator it returns there; the first item is pulled at once, in the same call."""
    index = model._pool.next_index()
    stream_id = uuid.uuid4().hex
    first = model._submit_to(index, model._runner, (_open, (stream_id, model.model_id, fn, args, encode)))
    return ModelStream(model, index, stream_id, first)


def _close_in(model: Any, index: int, stream_id: str) -> None:
    try:
        model._pool.submit_to(index, _close, stream_id)
    except Exception:  # noqa: BLE001 - the pool is shut down or the interpreter lost: the stream is gone with it
        pass


# -- run inside each interpreter -------------------------------------------------------------------

# The open streams of this interpreter: id -> (model id, iterator, item encoder).
_streams: dict[str, tuple[str, Iterator[Any], Callable[[Any], Any] | None]] = {}


# Both run as `fn(model, *args)` through the model's runner (see `ReplicatedModel._runner`).


def _open(model: Any, stream_id: str, model_id: str, fn: Callable[..., Any], args: tuple[Any, ...],
          encode: Callable[[Any], Any] | None) -> tuple[bool, Any]:
    result = fn(model, *args)
    if not _signature.is_stream(result):
        raise TypeError(f"a streaming call must return an iterator (a generator, say), not a {type(result).__name__}")
    _streams[stream_id] = (model_id, result, encode)
    return _pull(model, stream_id)


def _pull(model: Any, stream_id: str) -> tuple[bool, Any]:
    entry = _streams.get(stream_id)
    if entry is None:
        raise StreamClosed(f"stream {stream_id} is not open in this interpreter: it ended or was closed, or the "
                           "interpreter that held it was lost")
    _, iterator, encode = entry
    try:
        item = next(iterator, _END)
    except BaseException:
        _streams.pop(stream_id, None)  # a generator that raised is finished
        raise
    if item is _END:
        _streams.pop(stream_id, None)
        return True, None
    return False, item if encode is None else encode(item)


_END = object()


def _close(stream_id: str) -> bool:
    entry = _streams.pop(stream_id, None)
    if entry is None:
        return False
    close = getattr(entry[1], "close", None)
    if close is not None:
        close()  # GeneratorExit at the generator's yield: its finally blocks and context managers run
    return True


def close_model_streams(model_id: str) -> None:
    """Close this interpreter's open streams of `model_id` (it is being dropped)."""
    for stream_id in [s for s, (m, _, _) in _streams.items() if m == model_id]:
        _close(stream_id)

