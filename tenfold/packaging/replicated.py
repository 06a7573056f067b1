"""One archive served by every interpreter of a pool, all sharing one copy of the weights.

The host maps the archive (or takes the caller's buffer) once and hands the same buffer to every
interpreter; each rebuilds the model with its weights as views into that host memory. The host keeps
the buffer alive until `close()` has dropped the model from every interpreter: the views point into it.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import _signature, streaming
from .archive import Archive, Source, open_source
from .errors import SharedWeightWrite
from .manifest import Manifest
from .reader import is_shared_write, unpickle

if TYPE_CHECKING:
    from tenfold.runtime import InterpreterPool

# Host side: buffers that interpreters' models point into, by model id. Dropped only by close(), so a
# ReplicatedModel collected without close() leaks its buffer rather than leaving dangling views.
_host_buffers: dict[str, Any] = {}
_host_lock = threading.Lock()

# Interpreter side: the models loaded into this interpreter, by model id.
_models: dict[str, _Loaded] = {}


class _Loaded:
    """A model as loaded in one interpreter, with what checking its inputs there needs."""

    __slots__ = ("model", "label", "inputs", "signature")

    def __init__(self, model: Any, label: str, manifest: Manifest) -> None:
        self.model, self.label = model, label
        self.inputs, self.signature = list(manifest.inputs), manifest.signature()


class ReplicatedModel:
    """A model loaded into every interpreter of a pool. Call it, or `submit` to get a Future."""

    def __init__(self, pool: InterpreterPool, model_id: str, manifest: Manifest, label: str, setup: int) -> None:
        self._pool = pool
        self._id = model_id
        self._setup = setup
        self._label = label
        self._closed = False
        self._poisoned: SharedWeightWrite | None = None
        self._lock = threading.Lock()
        self._calls: dict[Future, Future] = {}  # ours -> the pool's, while the call is not settled
        self._streams: weakref.WeakSet[streaming.ModelStream] = weakref.WeakSet()
        self.manifest = manifest
        self._signature = manifest.signature()

    @property
    def model_id(self) -> str:
        """The id this model is loaded under in every interpreter (see `apply_loaded`)."""
        return self._id

    @property
    def in_use(self) -> int:
        """Calls submitted to this model and not yet settled, and its streams not yet closed: what must end
        before `close()` takes nothing from anyone."""
        return len(self._calls) + sum(1 for s in list(self._streams) if not s.closed)

    def check_inputs(self, inputs: tuple[Any, ...] | list[Any]) -> None:
        """Raise ValueError naming the first input that surely does not match the manifest's signature (count,
        and tensors' dtype and shape); the rest is checked where the model runs."""
        _signature.check_inputs(self.manifest.inputs, inputs, self._signature)

    def submit(self, *inputs: Any) -> Future:
        """Run the model on `inputs` in the next free interpreter; a Future of its result.

        The inputs are the model's positional arguments as Python values: tensors, numpy arrays or nested
        lists for tensor inputs, any value for the others. They are checked against the signature (here
        what can be, the rest in the interpreter, before the model runs): one that does not fit fails the
        Future with a ValueError naming it."""
        self.check_inputs(inputs)
        return self._submit(_run, inputs)

    def apply(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        """Run `fn(model, *args)` in the next free interpreter, with the model as loaded there (under
        `torch.no_grad`): e.g. decode a request and encode the answer next to the model, off the host's GIL.

        `fn` must be importable by the interpreters (a module-level function); its inputs are not checked.
        """
        return self._submit(_apply, (fn, args))

    def broadcast(self, fn: Callable[..., Any], /, *args: Any) -> list[Any]:
        """Run `fn(model, *args)` once in every interpreter (e.g. to inspect each copy); results in
        interpreter order."""
        self._check_usable()
        return self._pool.broadcast(_apply, self._id, (fn, args))

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"model {self.manifest.name!r} ({self._label}) was closed")
        if self._poisoned is not None:
            raise SharedWeightWrite(
                self._label,
                f"model {self.manifest.name!r} wrote into its shared weights in an earlier call, so they no longer "
                "hold the archive's values; close it and replicate the archive again (with copy_weights=True)",
            ) from self._poisoned

    def stream(self, *inputs: Any) -> streaming.ModelStream:
        """Run a streaming model (its call returns an iterator) on `inputs` in the next free interpreter: its
        items, pulled one at a time from that interpreter as the model yields them. Inputs are checked as by
        `submit`."""
        self.check_inputs(inputs)
        return self.open_stream(_call_checked, self._id, *inputs)

    def open_stream(self, fn: Callable[..., Any], /, *args: Any, encode: Callable[[Any], Any] | None = None
                    ) -> streaming.ModelStream:
        """Run `fn(model, *args)`, which returns an iterator, in the next free interpreter, as `apply` runs
        `fn`; the iterator stays there and its items are pulled one at a time (each passed through `encode`
        there first, if given: e.g. to JSON)."""
        self._check_usable()
        stream = streaming.open_stream(self, fn, args, encode)
        self._streams.add(stream)
        return stream

    @property
    def _runner(self) -> Callable[[str, tuple[Callable[..., Any], tuple[Any, ...]]], Any]:
        """What runs `fn(model, *args)` in an interpreter, with the model as loaded there (see `apply`)."""
        return _apply

    def _submit(self, runner: Callable[..., Any], payload: tuple[Any, ...]) -> Future:
        return self._submit_to(None, runner, payload)

    def _submit_to(self, index: int | None, runner: Callable[..., Any], payload: tuple[Any, ...]) -> Future:
        self._check_usable()
        outer: Future = Future()
        inner = (self._pool.submit(runner, self._id, payload) if index is None else
                 self._pool.submit_to(index, runner, self._id, payload))
        self._calls[outer] = inner
        inner.add_done_callback(lambda f: self._settle(outer, f))
        return outer

    def interrupt(self, future: Future, *, grace_s: float = 1.0) -> bool:
        """Stop the call behind `future` (from `submit`), e.g. past a deadline; see `InterpreterPool.interrupt`.

        A queued call is cancelled; a running one gets TimeoutError raised in its interpreter, and `future`
        fails with it. Returns True once that interpreter is free again, False if it was marked lost (the
        call is stuck in native code; `future` then fails with InterpreterLost).
        """
        inner = self._calls.get(future)
        if inner is None:
            return future.done()
        return self._pool.interrupt(inner, grace_s=grace_s)

    def _settle(self, outer: Future, inner: Future) -> None:
        # Dropped here, not left to a weak mapping: the pool's future holds this callback, which holds ours.
        self._calls.pop(outer, None)
        if inner.cancelled():  # by interrupt() while still queued
            outer.cancel()
            return
        exc = inner.exception()
        if exc is None:
            outer.set_result(inner.result())
            return
        if isinstance(exc, SharedWeightWrite):
            self._poisoned = exc
        outer.set_exception(exc)

    def __call__(self, *inputs: Any) -> Any:
        return self.submit(*inputs).result()

    def close(self) -> None:
        """Drop the model from every interpreter, then release the shared buffer. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._pool.remove_setup(self._setup)
            with contextlib.suppress(RuntimeError):  # the pool was shut down first: nothing left to drop from
                self._pool.broadcast(_drop, self._id)
        finally:
            with _host_lock:
                _host_buffers.pop(self._id, None)

    def __enter__(self) -> ReplicatedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"on {self._pool.size} interpreter(s)"
        return f"<ReplicatedModel {self.manifest.name!r} {self._signature} {state}>"


def replicate(
    pool: InterpreterPool,
    source: Source,
    *,
    sha256: str | None = None,
    copy_weights: bool = False,
    strict_requirements: bool = False,
    rolling: bool = False,
) -> ReplicatedModel:
    """Load the archive at `source` (a path or a bytes-like buffer) into every interpreter of `pool`.

    The archive is validated in the host first (zip, manifest, `sha256` pin); then every interpreter
    loads it from the same buffer, with its weights as views into that buffer: one copy of the weights
    per process, however many interpreters serve it. `copy_weights=True` gives every interpreter a
    private copy instead (for models that write into their weights). The archive's requirements are
    checked as by `load` (`strict_requirements` turns a version difference into an error). `rolling=True` loads
    it into one interpreter at a time, so that a pool that is serving keeps its other interpreters taking calls.
    """
    import pickle

    view, label = open_source(source)
    archive = Archive(view, label)
    manifest = archive.check_loadable(sha256=sha256, copy_weights=copy_weights,
                                      strict_requirements=strict_requirements)
    model_id = uuid.uuid4().hex
    with _host_lock:
        _host_buffers[model_id] = view
    try:
        # A setup, not a broadcast: an interpreter that replaces a lost one loads the model too.
        add = pool.add_rolling_setup if rolling else pool.add_setup
        setup = add(_load, model_id, pickle.PickleBuffer(view), label, copy_weights)
    except BaseException:
        try:
            pool.broadcast(_drop, model_id)
        finally:
            with _host_lock:
                _host_buffers.pop(model_id, None)
        raise
    return ReplicatedModel(pool, model_id, manifest, label, setup)


# -- run inside each interpreter -------------------------------------------------------------------


def _load(model_id: str, buffer: Any, label: str, copy_weights: bool) -> bool:
    # The host checked this archive against this same environment (the interpreters share its sys.path
    # and site-packages): only the unpickling is left to do here.
    archive = Archive(open_source(buffer)[0], label)
    model = unpickle(archive, archive.manifest.entry, copy_weights)
    _models[model_id] = _Loaded(model, label, archive.manifest)
    return True


def prepare_interpreter() -> None:
    """Import what loading an archive needs (torch above all): a pool's initializer, so that this happens
    while the host is still getting the archive's bytes."""
    import torch  # noqa: F401

    from . import reader  # noqa: F401


def _run(model_id: str, inputs: tuple[Any, ...]) -> Any:
    loaded = _loaded(model_id)
    return _apply(model_id, (_call, tuple(_signature.prepare_inputs(loaded.model, loaded.inputs, inputs,
                                                                     loaded.signature))))


def _call(model: Any, *inputs: Any) -> Any:
    return model(*inputs)


def _call_checked(model: Any, model_id: str, *inputs: Any) -> Any:
    loaded = _loaded(model_id)
    return model(*_signature.prepare_inputs(model, loaded.inputs, inputs, loaded.signature))


def _loaded(model_id: str) -> _Loaded:
    loaded = _models.get(model_id)
    if loaded is None:
        raise RuntimeError(f"model {model_id} is not loaded in this interpreter (closed?)")
    return loaded


def _apply(model_id: str, call: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    import torch

    loaded = _loaded(model_id)
    fn, args = call
    try:
        with torch.no_grad():
            return fn(loaded.model, *args)
    except RuntimeError as exc:
        if is_shared_write(exc):
            raise SharedWeightWrite(
                loaded.label,
                "the model wrote into one of its weights during inference; weights are shared by every "
                "interpreter and read-only. Fix the model, or load it with copy_weights=True",
            ) from None
        raise


def apply_loaded(model_id: str, fn: Callable[..., Any], /, *args: Any) -> Any:
    """`fn(model, *args)` with the model `model_id` as loaded in *this* interpreter (under torch.no_grad), as
    `ReplicatedModel.apply` runs it: for code that already runs inside the interpreter, e.g. its HTTP server."""
    return _apply(model_id, (fn, args))


def _drop(model_id: str) -> bool:
    streaming.close_model_streams(model_id)
    return _models.pop(model_id, None) is not None
