"""InterpreterPool: a concurrent.futures.Executor over N interpreters of one process."""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future, InvalidStateError
from typing import Any, Literal

from . import _glibc, _guest
from ._interpreter import Interpreter, NamespaceInterpreter, ThreadInterpreter
from .errors import BrokenInterpreterPool, InterpreterLost, InterpreterStartError, PlatformNotSupported, RuntimeFault
from .stats import BusyMeter, InterpreterStats, PoolStats

Backend = Literal["auto", "namespaces", "threads"]

# Interpreters outlive pools: glibc cannot safely unload a namespace that has run Python, so a pool's
# shutdown parks its interpreters here and the next pool takes them before starting new ones.
_registry_lock = threading.Lock()
_parked: list[NamespaceInterpreter] = []
_alive = 0
_live_pools: weakref.WeakSet[InterpreterPool] = weakref.WeakSet()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def resolve_backend(backend: str) -> str:
    """'auto' -> 'namespaces' where the platform can host them, else 'threads' (with a warning)."""
    if backend not in ("auto", "namespaces", "threads"):
        raise ValueError(f"backend must be 'auto', 'namespaces' or 'threads', not {backend!r}")
    if backend != "auto":
        return backend
    try:
        _glibc.check_platform()
    except PlatformNotSupported as exc:
        warnings.warn(f"tenfold falls back to the threads backend (GIL-bound): {exc}", RuntimeWarning, stacklevel=3)
        return "threads"
    return "namespaces"


class _WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs", "taken")

    def __init__(self, future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs
        self.taken = False  # handed to an idle interpreter at submit: running, as a stdlib worker's item is


class _Slot:
    """A pool's hold on one interpreter: its queue and its figures."""

    def __init__(self, index: int, interpreter: Interpreter, window_s: float) -> None:
        self.index = index
        self.interpreter = interpreter
        self.queue: collections.deque[_WorkItem] = collections.deque()
        self.running = False
        self.current: tuple[Future, int] | None = None  # the running call's future and call id
        self.interrupting = False  # its running call is being interrupted: it takes no new call meanwhile
        self.calls = 0
        self.errors = 0
        self.lost = False
        self.replaced = 0  # interpreters that took this place after the one before was lost
        self.meter = BusyMeter(window_s)
        self.released = threading.Event()
        self.replace_error: str | None = None  # why a lost interpreter could not be replaced

    @property
    def pending(self) -> int:
        return len(self.queue) + self.running


class InterpreterPool(Executor):
    """Runs calls in `size` interpreters of this process.

    With the ``namespaces`` backend each interpreter is a full CPython (with its own GIL, modules and
    torch) loaded into its own glibc link-map namespace, so calls run in parallel on several cores.
    ``threads`` runs the same API over threads of the host interpreter (GIL-bound); ``auto`` picks
    ``namespaces`` where the platform can host them.

    `fn` travels by reference (module and qualified name), as with ProcessPoolExecutor; arguments and
    results cross by pickle protocol 5, and the buffers of numpy arrays, pyarrow arrays and contiguous
    CPU tensors are seen in place by the interpreter while the call lasts (no copy).

    Namespace interpreters outlive pools (glibc cannot unload a namespace that has run Python): a
    shut-down pool parks them and the next pool in the process takes them. A new pool sets their
    sys.path (the host's at creation) and thread budget again, but modules an earlier pool imported
    stay imported, with whatever module state they were left in. At most 15 are alive per process.

    An interpreter stuck in native code past an interrupt is lost (see `interrupt`). With `replace_lost`
    (the default) the pool starts another in its place while the process has room for one, runs the
    initializer and every `add_setup` function in it, and routes calls to it once that is done.
    """

    def __init__(
        self,
        size: int,
        *,
        backend: Backend = "auto",
        threads_per_interpreter: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        utilization_window_s: float = 10.0,
        replace_lost: bool = True,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be greater than 0, got {size!r}")
        if threads_per_interpreter is not None and threads_per_interpreter < 1:
            raise ValueError(f"threads_per_interpreter must be at least 1, got {threads_per_interpreter}")
        if utilization_window_s <= 0:
            raise ValueError("utilization_window_s must be greater than 0")
        self.backend = resolve_backend(backend)
        self.size = size
        self.threads_per_interpreter = threads_per_interpreter or max(1, usable_cores() // size)
        self._lock = threading.Lock()
        self._shutdown = False
        self._next = 0
        self._replace_lost = replace_lost
        # What every interpreter runs before taking calls: kept, so that a replacement runs it too.
        self._setups: dict[int, tuple[Callable[..., Any], tuple, dict]] = {}
        self._setup_tokens = itertools.count()
        interpreters = self._acquire(size)
        self._slots = [_Slot(i, it, utilization_window_s) for i, it in enumerate(interpreters)]
        # A pool dropped without shutdown still gives its interpreters back once it is collected.
        self._finalizer = weakref.finalize(self, _release_all, self._slots)
        try:
            self._prepare(initializer, initargs)
        except BaseException:
            self.shutdown(wait=True)
            raise
        _live_pools.add(self)
        _register_atexit()

    # -- start-up -----------------------------------------------------------------------------

    def _acquire(self, size: int) -> list[Interpreter]:
        global _alive
        if self.backend == "threads":
            return [ThreadInterpreter(f"tenfold-thread-{i}") for i in range(size)]
        _glibc.check_platform()
        with _registry_lock:
            reused = [_parked.pop() for _ in range(min(size, len(_parked)))]
            new = size - len(reused)
            try:
                _glibc.check_capacity(new, _alive)
            except ValueError:
                _parked.extend(reused)
                raise
            _alive += new
        started = [NamespaceInterpreter(index=_alive - new + i) for i in range(new)]
        failures = []
        for it in started:
            try:
                it.wait_ready()
            except BaseException as exc:  # noqa: BLE001 - all are reported together
                failures.append(exc)
        if failures:
            with _registry_lock:  # a failed interpreter is never reused, but its thread lives on
                _parked.extend(reused + [it for it in started if it.start_error is None])
            raise InterpreterStartError(f"{len(failures)} of {size} interpreter(s) failed to start") from failures[0]
        return [*reused, *started]

    def _prepare(self, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
        if self.backend == "namespaces":
            self.add_setup(_guest.configure, list(sys.path), self.threads_per_interpreter)
        if initializer is not None:
            try:
                self.add_setup(initializer, *initargs)
            except Exception as exc:
                raise BrokenInterpreterPool(f"the initializer {initializer!r} failed: {exc}") from exc

    def add_setup(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> int:
        """Run `fn(*args, **kwargs)` in every interpreter now, as `broadcast` does, and in every interpreter
        that later replaces a lost one, before it takes calls (e.g. loading a model). Returns a token for
        `remove_setup`; if `fn` fails anywhere, nothing is kept and the exception is raised."""
        with self._lock:
            token = next(self._setup_tokens)
            self._setups[token] = (fn, args, kwargs)
        try:
            self.broadcast(fn, *args, **kwargs)
        except BaseException:
            self.remove_setup(token)
            raise
        return token

    def add_rolling_setup(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> int:
        """As `add_setup`, but one interpreter at a time, each after the calls already queued there: the others
        keep taking calls meanwhile (e.g. a model loaded into a pool that is serving). An interpreter lost meanwhile
        is skipped (its replacement runs every setup); if `fn` fails anywhere, nothing is kept and the exception is
        raised (it is not undone where it ran)."""
        with self._lock:
            token = next(self._setup_tokens)
            self._setups[token] = (fn, args, kwargs)
            indices = [s.index for s in self._slots if not s.lost]
        try:
            for index in indices:
                try:
                    self.submit_to(index, fn, *args, **kwargs).result()
                except InterpreterLost:
                    continue
        except BaseException:
            self.remove_setup(token)
            raise
        return token

    def remove_setup(self, token: int) -> None:
        """Stop running a setup function in replacement interpreters (it is not undone where it ran)."""
        with self._lock:
            self._setups.pop(token, None)

    # -- Executor ------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule `fn(*args, **kwargs)` on an idle interpreter, else the one with the shortest queue."""
        with self._lock:
            self._check_open()
            return self._enqueue(self._choose(), fn, args, kwargs)

    def next_index(self) -> int:
        """The interpreter `submit` would schedule a call on now: for a caller that sends several calls to one
        interpreter (`submit_to`), e.g. to pull the items of an iterator that lives there."""
        with self._lock:
            self._check_open()
            return self._choose().index

    def _choose(self) -> _Slot:
        live = [s for s in self._slots if not s.lost]
        if not live:
            raise BrokenInterpreterPool("every interpreter of this pool was lost")
        # A call being interrupted may hold its interpreter for the whole grace period: queue elsewhere.
        live = [s for s in live if not s.interrupting] or live
        start = self._next = (self._next + 1) % len(live)
        return min(live[start:] + live[:start], key=lambda s: s.pending)

    def broadcast(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> list[Any]:
        """Run `fn(*args, **kwargs)` once in every interpreter; results in interpreter order."""
        with self._lock:
            self._check_open()
            futures = [self._enqueue(s, fn, args, kwargs) for s in self._slots if not s.lost]
        return [f.result() for f in futures]

    def submit_to(self, index: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule `fn(*args, **kwargs)` on interpreter `index` (as `stats()` numbers them), whatever its queue."""
        with self._lock:
            self._check_open()
            slot = self._slot(index)
            if slot.lost:
                raise InterpreterLost(f"interpreter {index} is not in service")
            return self._enqueue(slot, fn, args, kwargs)

    def retire(self, index: int, reason: str) -> None:
        """Take interpreter `index` out of service, as if it were lost (e.g. a server of its own died or is
        stuck): its queued calls move to the others, its running call fails with InterpreterLost, and with
        `replace_lost` another interpreter is started in its place."""
        with self._lock:
            slot = self._slot(index)
            if slot.lost:
                return
            current = slot.current
        self._lose(slot, current[0] if current is not None else None, reason)

    def _slot(self, index: int) -> _Slot:
        if not 0 <= index < len(self._slots):
            raise ValueError(f"interpreter index must be between 0 and {len(self._slots) - 1}, got {index}")
        return self._slots[index]

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work; run (or with cancel_futures, cancel) what is queued; park the interpreters."""
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            if cancel_futures:
                # As the stdlib executors do: what no interpreter has taken is cancelled; what one took runs.
                for slot in self._slots:
                    kept = [item for item in slot.queue if item.taken]
                    for item in slot.queue:
                        if not item.taken:
                            item.future.cancel()
                    slot.queue.clear()
                    slot.queue.extend(kept)
        if first:
            self._finalizer.detach()
            _release_all(self._slots)
        if wait:
            for slot in self._slots:
                if not slot.lost:  # a lost interpreter's thread may never come back
                    slot.released.wait()

    def interrupt(self, future: Future, *, grace_s: float = 1.0) -> bool:
        """Stop the call behind `future`, e.g. once it ran past a deadline.

        A queued call is cancelled. A running one gets TimeoutError raised inside its interpreter (a
        pure-Python loop stops there, and the future fails with that TimeoutError).
        If the interpreter has not returned after `grace_s` (stuck in native code), it is marked lost:
        the pool stops routing to it, its queued calls move to the others, the future fails with
        InterpreterLost, and `stats()` says so. Returns True once the interpreter is free again.
        """
        if future.cancel() or future.done():
            return True
        deadline = time.monotonic() + grace_s
        while True:
            with self._lock:
                found = next(((s, s.current[1]) for s in self._slots
                              if s.current is not None and s.current[0] is future), None)
                # Taken at submit by an idle interpreter and about to start there: wait for it to.
                taken = found is None and any(item.future is future for s in self._slots for item in s.queue)
            if found is not None or not taken or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        if found is None:
            return future.done()
        slot, call_id = found
        with self._lock:
            # What waits behind the interrupted call need not wait out its grace period: it moves to the others.
            slot.interrupting = True
            others = [s for s in self._slots if not s.lost and not s.interrupting]
            if others:
                waiting = [item for item in slot.queue if not item.taken]
                for item in waiting:
                    slot.queue.remove(item)
                self._move(waiting, others)
        try:
            slot.interpreter.interrupt(call_id)
            done = _wait_done(future, grace_s)
        finally:
            slot.interrupting = False
        if done:
            return True
        self._lose(slot, future, f"interpreter {slot.index} did not return within {grace_s} s of an interrupt")
        return False

    def _lose(self, slot: _Slot, future: Future | None, reason: str) -> None:
        with self._lock:
            slot.lost = True
            moved = list(slot.queue)
            slot.queue.clear()
            self._move(moved, [s for s in self._slots if not s.lost])
            replace = self._replace_lost and not self._shutdown
        if future is not None:
            _fail(future, InterpreterLost(reason))
        if replace:
            threading.Thread(target=self._replace, args=(slot,), name=f"tenfold-replace-{slot.index}",
                             daemon=True).start()

    def _move(self, items: list[_WorkItem], targets: list[_Slot]) -> None:
        """Queue `items` (taken off another interpreter's queue) on the shortest of `targets`' queues; with no
        target, they fail. Called with the lock held."""
        for item in items:
            if targets:
                target = min(targets, key=lambda s: s.pending)
                target.queue.append(item)
                target.interpreter.post(functools.partial(self._run_next, target, target.interpreter))
            else:
                _fail(item.future, BrokenInterpreterPool("every interpreter of this pool was lost"))

    def _replace(self, slot: _Slot) -> None:
        """Start an interpreter in the place of `slot`'s lost one, set it up, and put it in service; where the
        process has no room for another, the place stays lost."""
        try:
            (it,) = self._acquire(1)
        except (ValueError, RuntimeFault) as exc:
            slot.replace_error = str(exc)
            return
        done: dict[int, Any] = {}
        try:
            while True:  # a setup added while this one was being set up runs too
                with self._lock:
                    todo = [(t, s) for t, s in self._setups.items() if t not in done]
                    if not todo or self._shutdown:
                        if not self._shutdown:
                            slot.interpreter, slot.lost = it, False
                            slot.replaced += 1
                            slot.released = threading.Event()
                        break
                for token, (fn, args, kwargs) in todo:
                    done[token] = _call_on(it, fn, args, kwargs)
        except BaseException as exc:  # noqa: BLE001 - the place stays lost, and says why
            slot.replace_error = f"{type(exc).__name__}: {exc}"
        if slot.interpreter is not it:  # not put in service: give it back for another pool
            _release(_Slot(slot.index, it, 1.0))

    @property
    def healthy(self) -> int:
        """How many interpreters are in service (not lost)."""
        return sum(not s.lost for s in self._slots)

    def stats(self) -> PoolStats:
        """Per-interpreter calls, errors, busy seconds, queue depth and recent utilization."""
        now = time.monotonic()
        return PoolStats(
            backend=self.backend,
            interpreters=[
                InterpreterStats(
                    index=s.index,
                    calls=s.calls,
                    errors=s.errors,
                    busy_s=s.meter.busy_s,
                    queue_depth=s.pending,
                    utilization=s.meter.utilization(now),
                    lost=s.lost,
                    replaced=s.replaced,
                    replace_error=s.replace_error if s.lost else None,
                )
                for s in self._slots
            ],
        )

    # -- internals -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _enqueue(self, slot: _Slot, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Future:
        future: Future = Future()
        item = _WorkItem(future, fn, args, kwargs)
        if not slot.running and not slot.queue and not slot.lost:
            # An idle interpreter takes the call now (its thread starts it at once): like a stdlib worker's,
            # it is running from here on, so that neither cancel() nor shutdown(cancel_futures=True) drops it.
            item.taken = future.set_running_or_notify_cancel()
        slot.queue.append(item)
        slot.interpreter.post(functools.partial(self._run_next, slot, slot.interpreter))
        return future

    def _run_next(self, slot: _Slot, it: Interpreter) -> None:
        with self._lock:
            if slot.interpreter is not it:
                return  # posted to an interpreter since lost and replaced: its calls moved on
            if not slot.queue:
                return  # cancelled by shutdown(cancel_futures=True)
            item = slot.queue.popleft()
            slot.running = True
        try:
            if not item.taken and not item.future.set_running_or_notify_cancel():
                return
            meter = slot.meter
            meter.begin(time.monotonic())
            slot.current = (item.future, it.call_id + 1)
            try:
                result = it.call(item.fn, item.args, item.kwargs)
            except BaseException as exc:  # noqa: BLE001 - it belongs to the caller's Future
                meter.end(time.monotonic())
                slot.calls += 1
                slot.errors += 1
                _fail(item.future, exc)
                del exc
            else:
                meter.end(time.monotonic())
                slot.calls += 1
                try:
                    item.future.set_result(result)
                except InvalidStateError:
                    pass  # already failed by interrupt() as lost
                del result
        finally:
            slot.current = None
            del item  # no reference to fn, its arguments or its result outlives the call
            slot.running = False

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<InterpreterPool size={self.size} backend={self.backend!r} {state}>"


def _release_all(slots: list[_Slot]) -> None:
    """Give each slot's interpreter back once the work queued before this call is done."""
    for slot in slots:
        slot.interpreter.post(functools.partial(_release, slot))


def _release(slot: _Slot) -> None:
    it = slot.interpreter
    if isinstance(it, NamespaceInterpreter):
        with _registry_lock:
            if not slot.lost:  # a lost interpreter is never handed to another pool; it still counts as alive
                _parked.append(it)
    else:
        it.stop()
    slot.released.set()


def _call_on(it: Interpreter, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)` run in `it` by its owner thread, waited for (before `it` takes a pool's calls)."""
    future: Future = Future()

    def job() -> None:
        try:
            future.set_result(it.call(fn, args, kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(exc)

    it.post(job)
    return future.result()


def _fail(future: Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except InvalidStateError:
        pass  # already settled (cancelled, or failed as lost)


def _wait_done(future: Future, timeout: float) -> bool:
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    return done.wait(timeout)


def interpreters_alive() -> int:
    """Namespace interpreters alive in this process (in pools or parked)."""
    return _alive


def interpreters_parked() -> int:
    """Namespace interpreters alive in this process that no pool holds (the next pool takes them)."""
    return len(_parked)


_atexit_registered = False


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_shutdown_all)


def _shutdown_all(grace_s: float = 5.0) -> None:
    # Stop every pool before the host finalises: a call still running in a namespace when the host's
    # GIL goes away would make its owner thread exit (pitfall 5). Queued calls are cancelled and running
    # ones interrupted, so that exit (Ctrl-C included) does not wait on work nobody will read.
    pools = list(_live_pools)
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)
    for pool in pools:
        for slot in pool._slots:
            current = slot.current
            if current is not None and not slot.lost:
                pool.interrupt(current[0], grace_s=grace_s)
    for pool in pools:
        for slot in pool._slots:
            if not slot.lost:
                slot.released.wait(grace_s)
