"""One interpreter and the one thread that owns it for life.

Both backends give the pool the same small surface, the `Interpreter` protocol: `post(job)` runs `job()`
on the owner thread; `call(fn, args, kwargs)` (owner thread only) runs `fn` in the interpreter and
returns its result; `interrupt(call_id)` stops a running call from any thread.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

from . import _glibc, _wire
from .errors import InterpreterStartError, RemoteError, RemoteTraceback

_ERR_SIZE = 1 << 16
#: How long an interrupt waits for a call handed to the interpreter to start running there.
_START_WAIT_S = 5.0


_HOST_SET_ASYNC_EXC = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_HOST_CLEAR_ASYNC_EXC = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


class Interpreter(Protocol):
    """What the pool needs of an interpreter, whichever backend runs it."""

    backend: str
    call_id: int  # id of the latest call; the one running while the owner thread is in `call`
    start_error: BaseException | None

    def post(self, job: Callable[[], Any] | None) -> None:
        """Run `job()` on the owner thread, after the jobs posted before it."""

    def wait_ready(self) -> None:
        """Block until the interpreter can take calls; raise why it cannot."""

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run `fn(*args, **kwargs)` in the interpreter and return its result (owner thread only)."""

    def interrupt(self, call_id: int) -> None:
        """Raise TimeoutError inside the interpreter if call `call_id` is still running there."""

    def stop(self) -> None:
        """Let the owner thread end once its queued jobs are done, where the backend allows it."""


class _OwnedThread:
    """A thread that runs posted jobs in order, started by the subclass's `_boot`."""

    daemon_forever = False

    def __init__(self, name: str) -> None:
        self.call_id = 0  # id of the latest call; the one running while `busy`
        self._inbox: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self.start_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def post(self, job: Callable[[], Any] | None) -> None:
        self._inbox.put(job)

    def wait_ready(self) -> None:
        self._ready.wait()
        if self.start_error is not None:
            raise self.start_error

    def _run(self) -> None:
        try:
            self._boot()
        except BaseException as exc:  # noqa: BLE001 - reported through wait_ready
            self.start_error = exc
        self._ready.set()
        while True:
            job = self._inbox.get()
            if job is None:
                if self.daemon_forever:
                    continue  # pitfall 5: a thread that entered a namespace never exits
                return
            try:
                job()
            except BaseException:  # noqa: BLE001 - jobs report their own errors; the thread must live on
                pass
            del job

    def _boot(self) -> None:
        pass


class ThreadInterpreter(_OwnedThread):
    """The `threads` backend: a thread of the host interpreter (shares its GIL)."""

    backend = "threads"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._running = 0
        self._interrupted = False
        self._set_async_exc = _HOST_SET_ASYNC_EXC

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        _wire.request(fn, args, kwargs)  # the same rules for fn as in a namespace: code that runs here runs there
        self.call_id += 1
        self._running = self.call_id
        try:
            try:
                return fn(*args, **kwargs)
            finally:
                self._running = 0
                if self._interrupted:  # an interrupt that came as the call ended must not hit the next one
                    self._interrupted = False
                    _HOST_CLEAR_ASYNC_EXC(self.thread.ident, None)
        except Exception as exc:  # raised as the namespaces backend raises it: with the traceback as its cause
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            exc.__cause__ = RemoteTraceback(tb)
            raise

    def interrupt(self, call_id: int) -> None:
        """Raise TimeoutError in the thread if call `call_id` is still running there (once it has started, if
        it was handed over but has not yet)."""
        deadline = time.monotonic() + _START_WAIT_S
        while self.call_id < call_id and time.monotonic() < deadline:
            time.sleep(0.001)
        if self._running == call_id:  # under the host GIL: the thread cannot move on meanwhile
            self._interrupted = True
            self._set_async_exc(self.thread.ident, TimeoutError)

    def stop(self) -> None:
        self.post(None)


class NamespaceInterpreter(_OwnedThread):
    """A full CPython loaded with dlmopen into its own link-map namespace."""

    backend = "namespaces"
    daemon_forever = True

    def __init__(self, index: int) -> None:
        self.index = index
        self.namespace: _glibc.Namespace | None = None
        super().__init__(f"tenfold-interpreter-{index}")

    def _boot(self) -> None:
        ns = self.namespace = _glibc.Namespace()
        ns.enter_thread()
        # No automatic site: the interpreter would pick its site-packages from whatever `python3` is on
        # PATH. The bootstrap processes the host's own site directories instead (editable installs
        # add import hooks there, not path entries), then takes the host's sys.path.
        ctypes.c_int.from_address(ns.address("Py_NoSiteFlag")).value = 1
        ns.sym("Py_InitializeEx", None, (ctypes.c_int,))(0)  # 0: install no signal handlers
        ns.sym("PyEval_SaveThread", ctypes.c_void_p)()  # release this interpreter's GIL
        self._gil_ensure = ns.sym("PyGILState_Ensure", ctypes.c_int)
        self._gil_release = ns.sym("PyGILState_Release", None, (ctypes.c_int,))
        self._run_string = ns.sym("PyRun_SimpleString", ctypes.c_int, (ctypes.c_char_p,))
        slot = ctypes.c_void_p(0)
        err = ctypes.create_string_buffer(_ERR_SIZE)
        code = _BOOTSTRAP.format(
            path=list(sys.path),
            sites=_site_dirs(),
            prefix=(sys.prefix, sys.exec_prefix),
            executable=sys.executable,
            environ=dict(os.environ),
            slot=ctypes.addressof(slot),
            err=ctypes.addressof(err),
            errsize=_ERR_SIZE - 1,
            libpython=_glibc.libpython_path(),
        )
        self._exec(code)
        if not slot.value:
            reason = err.value.decode(errors="replace")
            raise InterpreterStartError(f"interpreter {self.index} failed to start:\n{reason}")
        self._handler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(slot.value)
        self._block = _wire.CallBlock()
        self._address = _wire.BufferAddresses(ctypes.pythonapi)
        self._encoder = _wire.Encoder()
        self._interrupter: _Interrupter | None = None
        self._set_async_exc = ns.sym("PyThreadState_SetAsyncExc", ctypes.c_int, (ctypes.c_ulong, ctypes.c_void_p))
        self._timeout_error = ctypes.c_void_p.from_address(ns.address("PyExc_TimeoutError")).value

    def interrupt(self, call_id: int) -> None:
        """Raise TimeoutError inside the interpreter if call `call_id` is still running there.

        Runs on a helper thread of this interpreter's own (created once, never exits: pitfall 5), which
        takes the interpreter's GIL; a call stuck in native code that holds that GIL blocks the helper,
        and the pool then declares the interpreter lost.
        """
        if self._interrupter is None:
            self._interrupter = _Interrupter(self)
        self._interrupter.post(lambda: self._raise_timeout(call_id))

    def _raise_timeout(self, call_id: int) -> None:
        # The pool may interrupt a call as soon as it hands it over, before the interpreter runs it (its payload
        # still being written or unpickled): wait for it to start running, or to have ended, then act.
        deadline = time.monotonic() + _START_WAIT_S
        while True:
            g = self._gil_ensure()
            try:
                slots = self._block.slots
                if slots[_wire.RUNNING] == call_id:
                    slots[_wire.INTERRUPTED] = 1
                    self._set_async_exc(self.thread.ident, self._timeout_error)
                    return
                handed = slots[_wire.CALL_ID]
                starting = handed < call_id or (handed == call_id and slots[_wire.STATUS] == _wire.STATUS_NONE)
            finally:
                self._gil_release(g)
            if not starting or time.monotonic() > deadline:
                return
            time.sleep(0.001)

    def _exec(self, code: str) -> None:
        g = self._gil_ensure()
        try:
            self._run_string(code.encode())
        finally:
            self._gil_release(g)

    def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        w, block = _wire, self._block
        slots = block.slots
        try:
            data, pbufs = self._encoder.dumps(w.request(fn, args, kwargs))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise TypeError(f"cannot send this call to an interpreter: {exc}") from exc
        size = len(data)
        self.call_id += 1
        slots[w.CALL_ID] = self.call_id
        slots[w.STATUS] = w.STATUS_NONE
        slots[w.OP] = w.OP_CALL
        slots[w.PAYLOAD_SIZE] = size
        if size <= w.WINDOW_BYTES:
            block.request[:size] = data
            slots[w.PAYLOAD] = 0
        else:
            slots[w.PAYLOAD] = w.bytes_address(data)
        if pbufs:
            descs, views = w.describe(pbufs, self._address)
            slots[w.BUFFERS] = ctypes.addressof(descs)
            slots[w.NBUFFERS] = len(views)
        else:
            slots[w.NBUFFERS] = 0
        self._handler(block.address)
        status = slots[w.STATUS]
        if status == w.STATUS_NONE:
            raise TimeoutError("the call was interrupted before it could answer")
        size = slots[w.RESULT_SIZE]
        result = block.response[:size] if not slots[w.RESULT] else ctypes.string_at(slots[w.RESULT], size)
        if slots[w.NRESULT_BUFFERS]:
            try:
                rbufs = w.copy_buffers(slots[w.RESULT_BUFFERS], slots[w.NRESULT_BUFFERS])
            finally:  # the interpreter holds the result's buffers until told they were copied
                slots[w.OP] = w.OP_RELEASE
                self._handler(block.address)
        else:
            rbufs = []
        del data, pbufs
        try:
            obj = _wire.loads(bytes(result) if isinstance(result, memoryview) else result, rbufs)
            del result
        except Exception as exc:
            raise RemoteError(
                type(exc).__name__, f"the result could not be unpickled in the caller: {exc}", ""
            ) from exc
        if status == _wire.STATUS_ERROR:
            raise obj.rebuild()
        return obj

    def stop(self) -> None:
        """Nothing: a namespace interpreter is parked, never stopped (see the pool)."""


def _site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


class _Interrupter(_OwnedThread):
    """The thread that delivers interrupts to one namespace interpreter."""

    daemon_forever = True

    def __init__(self, target: NamespaceInterpreter) -> None:
        self._target = target
        super().__init__(f"tenfold-interrupter-{target.index}")
        self.wait_ready()

    def _boot(self) -> None:
        assert self._target.namespace is not None
        self._target.namespace.enter_thread()


# Runs in the fresh interpreter. Pitfall 2: torch asks ctypes for RTLD_GLOBAL, which crashes glibc
# inside a non-base namespace, so the flag is neutralised before anything is imported.
_BOOTSTRAP = """\
import ctypes, os, sys
ctypes.RTLD_GLOBAL = os.RTLD_GLOBAL = 0
try:
    import site
    for _d in {sites!r}:
        site.addsitedir(_d)
    sys.path[:] = {path!r}
    sys.prefix, sys.exec_prefix = {prefix!r}
    sys.executable = {executable!r}
    sys.argv = [""]
    for _k, _v in {environ!r}.items():
        if os.environ.get(_k) != _v:
            os.environ[_k] = _v
    import tenfold.runtime._guest as _tenfold_guest
    _tenfold_guest.start({slot}, {libpython!r})
except BaseException:
    import traceback as _tb
    _msg = _tb.format_exc().encode()[:{errsize}]
    ctypes.memmove({err}, _msg, len(_msg))
"""
