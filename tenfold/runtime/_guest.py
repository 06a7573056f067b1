"""The half of the runtime that runs *inside* each interpreter.

`start` installs one ctypes callback and writes its address where the host asked. The host calls that
address with a `Call`; the callback takes this interpreter's own GIL, runs the function and leaves the
pickled result in memory this interpreter owns until the host sends OP_RELEASE.
"""

from __future__ import annotations

import ctypes
import pickle
import threading
import traceback
from typing import Any

from . import _wire

_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)

_state: dict[str, Any] = {}


class RemoteFailure:
    """An exception raised in the interpreter, as it crosses back: its type, message and traceback as text,
    and the exception itself pickled (None if it does not pickle), to be re-created by the caller."""

    def __init__(self, exc: BaseException) -> None:
        self.type_name = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
        self.message = str(exc)
        self.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            self.pickled: bytes | None = pickle.dumps(exc, 5)
        except Exception:  # noqa: BLE001 - the caller gets a RemoteError with the text instead
            self.pickled = None

    def rebuild(self) -> BaseException:
        """The exception to raise in the caller: the original, re-created, with the interpreter's traceback
        as its cause; or a RemoteError carrying the text where it cannot be re-created here."""
        from .errors import RemoteError, RemoteTraceback

        exc: BaseException | None = None
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
            except Exception:  # noqa: BLE001 - e.g. its class lives only in the interpreter's modules
                exc = None
        if not isinstance(exc, BaseException):
            return RemoteError(self.type_name, self.message, self.traceback)
        exc.__cause__ = RemoteTraceback(self.traceback)
        return exc


_blocks: dict[int, _wire.RemoteBlock] = {}


def _handle(addr: int) -> int:
    w = _wire
    block = _blocks.get(addr)
    if block is None:
        block = _blocks[addr] = w.RemoteBlock(addr)
    slots = block.slots
    _state.pop("keep", None)
    if slots[w.OP] == w.OP_RELEASE:
        return 0
    status = w.STATUS_OK
    try:
        size = slots[w.PAYLOAD_SIZE]
        if slots[w.PAYLOAD]:
            payload: Any = ctypes.string_at(slots[w.PAYLOAD], size)
        else:
            payload = block.request[:size]
        nbuffers = slots[w.NBUFFERS]
        buffers = w.view_buffers(slots[w.BUFFERS], nbuffers) if nbuffers else ()
        fn, args, kwargs = w.unpack(pickle.loads(payload, buffers=buffers))
        del payload, buffers
        # While RUNNING holds this call's id, the host may raise TimeoutError in this thread (see
        # `interrupt`); an interrupt that arrives as the call ends is cleared so the next call is spared.
        slots[w.RUNNING] = slots[w.CALL_ID]
        try:
            result: Any = fn(*args, **kwargs)
        finally:
            slots[w.RUNNING] = 0
            if slots[w.INTERRUPTED]:
                _state["clear_async_exc"]()
                slots[w.INTERRUPTED] = 0
        del fn, args, kwargs
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller's Future
        result, status = RemoteFailure(exc), w.STATUS_ERROR
    encoder = _state["encoder"]
    try:
        data, pbufs = encoder.dumps(result)
    except BaseException as exc:  # noqa: BLE001
        err = TypeError(f"the result of type {type(result).__name__} cannot be sent back: {exc}")
        data, pbufs = encoder.dumps(RemoteFailure(err))
        status = w.STATUS_ERROR
    del result
    size = len(data)
    if pbufs:
        descs, views = w.describe(pbufs, _state["address"])
        # Each out-of-band buffer owns what it points into (a tensor's buffer owns the tensor, see
        # _wire._reduce_tensor): keeping them until the host has copied them (OP_RELEASE drops `keep`) is enough.
        _state["keep"] = (data, descs, views, pbufs)
        slots[w.RESULT_BUFFERS] = ctypes.addressof(descs)
        slots[w.NRESULT_BUFFERS] = len(views)
    else:
        slots[w.NRESULT_BUFFERS] = 0
    if size <= w.WINDOW_BYTES:
        block.response[:size] = data
        slots[w.RESULT] = 0
    else:
        _state["keep"] = (data, _state.get("keep"))
        slots[w.RESULT] = w.bytes_address(data)
    slots[w.STATUS] = status
    slots[w.RESULT_SIZE] = size
    return 0


def start(handler_slot: int, libpython: str) -> None:
    """Install the call handler and write its address to `handler_slot` (host memory)."""
    api = ctypes.PyDLL(libpython)  # this interpreter's own C API (ctypes.pythonapi is the host's)
    _state["api"] = api
    set_async_exc = api.PyThreadState_SetAsyncExc
    set_async_exc.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    ident = threading.get_ident()
    _state["clear_async_exc"] = lambda: set_async_exc(ident, None)
    _state["encoder"] = _wire.Encoder()
    _state["address"] = _wire.BufferAddresses(api)
    _state["handler"] = _HANDLER(_handle)
    ctypes.c_void_p.from_address(handler_slot).value = ctypes.cast(_state["handler"], ctypes.c_void_p).value


def configure(path: list[str], threads: int) -> None:
    """Per-pool settings: the pool's sys.path and this interpreter's intra-op thread budget.

    Pitfall 6: each interpreter has its own OpenMP runtime; its pool size is read from the environment
    when torch is first imported here, so the budget is set before that, and on torch if already there.
    """
    import os
    import sys

    sys.path[:] = path
    from ._glibc import bound_free_heap

    bound_free_heap()  # pitfall 16: this namespace's malloc gives back what large calls free
    # RAYON_NUM_THREADS: Hugging Face tokenizers start a Rust thread pool of their own, sized like OpenMP's.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise `exc_type` in thread `thread_id` of the calling interpreter at its next bytecode, e.g. to stop a
    call past its deadline; None withdraws one not raised yet. Works in the host interpreter too."""
    api = _state.get("api", ctypes.pythonapi)  # the host's, where this module was not started as a guest
    if exc_type is None:
        clear = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(("PyThreadState_SetAsyncExc", api))
        clear(thread_id, None)
    else:
        set_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(("PyThreadState_SetAsyncExc", api))
        set_exc(thread_id, exc_type)
