"""InterpreterPool: behaves as a concurrent.futures executor, runs calls in isolated interpreters."""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest
from support import ROOT, run_python, subprocess_env, wait_blocked, wait_blocked_reading, wait_for
from testmodels import runtime_funcs as funcs

from tenfold.runtime import (
    BrokenInterpreterPool,
    InterpreterLost,
    InterpreterPool,
    RemoteError,
    RemoteTraceback,
    _wire,
    interpreters_alive,
    interpreters_parked,
    remote_traceback,
)

BACKENDS = ["namespaces", "threads"]


@pytest.fixture(scope="module", params=BACKENDS)
def pool(request):
    with InterpreterPool(2, backend=request.param) as p:
        yield p


@pytest.fixture(scope="module")
def ns_pool():
    with InterpreterPool(2, backend="namespaces") as p:
        yield p


# -- isolation -------------------------------------------------------------------------------------


def test_each_interpreter_has_its_own_modules_in_the_same_process(ns_pool):
    host_modules = id(sys.modules)
    places = ns_pool.broadcast(funcs.where)
    assert {pid for pid, _, _ in places} == {os.getpid()}
    modules = {m for _, _, m in places}
    assert len(modules) == 2 and host_modules not in modules
    before = funcs.counter
    first = ns_pool.broadcast(funcs.bump)
    second = ns_pool.broadcast(funcs.bump)
    assert [b - a for a, b in zip(first, second)] == [1, 1]
    assert funcs.counter == before  # the host's module global is untouched


def test_two_calls_on_an_idle_pool_of_two_run_on_different_interpreters(pool):
    a, b = pool.submit(funcs.slow_where, 0.3), pool.submit(funcs.slow_where, 0.3)
    assert a.result() != b.result()


def test_broadcast_runs_once_in_every_interpreter_in_order(pool):
    pool.broadcast(funcs.echo, None)  # returns once every call queued before it is done
    before = [i.calls for i in pool.stats().interpreters]
    idents = pool.broadcast(funcs.slow_where, 0.0)
    after = [i.calls for i in pool.stats().interpreters]
    assert len(set(idents)) == 2
    assert [b - a for a, b in zip(before, after)] == [1, 1]


# -- one GIL per interpreter -----------------------------------------------------------------------


def _calls_that_ran_while_one_interpreter_held_its_gil(pool, hold_ms: int,
                                                       calls: int = 20) -> tuple[list[bool], bool, bool]:
    """One interpreter blocks in native code that keeps its GIL (poll() through a PyDLL handle, for at most
    `hold_ms`); meanwhile `calls` calls go one after another to the pool. Returns, for each call, whether it
    ran while the holder was inside that native call; whether the holder was still there once they were all
    done; and whether the byte written after them (not the timeout) ended its wait."""
    state = (ctypes.c_long * 2)()
    r, w = os.pipe()
    holder = pool.submit(funcs.hold_gil_in_poll, r, hold_ms, ctypes.addressof(state))
    try:
        # One at a time: the holder's interpreter has a call pending, so each goes to the other one.
        seen = [pool.submit(funcs.saw_holder_in_native_code, ctypes.addressof(state)).result(timeout=60)
                for _ in range(calls)]
        still_holding = not holder.done()
    finally:
        os.write(w, b"x")
        released = holder.result(timeout=60)
        os.close(r)
        os.close(w)
    return seen, still_holding, released


def test_while_one_interpreter_holds_its_gil_in_native_code_the_others_complete_calls(ns_pool):
    seen, still_holding, released = _calls_that_ran_while_one_interpreter_held_its_gil(ns_pool, hold_ms=60_000)
    assert seen == [True] * 20  # every call ran in the other interpreter while the first held its own GIL
    assert still_holding and released  # the holder stayed in native code until it was released


def test_on_the_threads_backend_no_call_runs_while_one_thread_holds_the_gil():
    with InterpreterPool(2, backend="threads") as p:
        seen, still_holding, released = _calls_that_ran_while_one_interpreter_held_its_gil(p, hold_ms=1_000)
    assert seen == [False] * 20  # each waited until the holder returned
    assert not released  # the holder's wait ended by its own timeout: nothing else could run to release it


# -- correctness under concurrency -------------------------------------------------------------------


def test_many_concurrent_submitters_get_their_own_results(pool):
    def submitter(k: int) -> list:
        futures = [pool.submit(funcs.echo, (k, i)) for i in range(500)]
        return [f.result(timeout=120) for f in futures]

    with cf.ThreadPoolExecutor(8) as clients:
        results = list(clients.map(submitter, range(8)))
    for k, got in enumerate(results):
        assert got == [(k, i) for i in range(500)]


# -- what crosses ----------------------------------------------------------------------------------


def _payload_size(fn, *args) -> int:
    data, _ = _wire.Encoder().dumps(_wire.request(fn, args, {}))
    return len(data)


def _bytes_pickling_to(size: int) -> bytes:
    """Random bytes whose call `echo(data)` pickles to exactly `size` bytes."""
    n = size
    for _ in range(5):
        n += size - _payload_size(funcs.echo, bytes(n))
    data = os.urandom(n)
    assert _payload_size(funcs.echo, data) == size
    return data


@pytest.mark.parametrize("over", [-1, 0, 1, 100, 4 * _wire.WINDOW_BYTES])
def test_arguments_and_results_around_and_past_the_inline_window_cross_intact(ns_pool, over):
    # The pickled call is `over` bytes past the window, and its result (the same bytes) about as large.
    data = _bytes_pickling_to(_wire.WINDOW_BYTES + over)
    assert ns_pool.submit(funcs.echo, data).result(timeout=30) == data
    doc = {"text": "é" * (3 * _wire.WINDOW_BYTES), "rows": list(range(20_000)), "blob": data}
    assert ns_pool.submit(funcs.echo, doc).result(timeout=30) == doc


def test_keyword_arguments_reach_the_function_through_submit_and_broadcast(pool):
    assert pool.submit(funcs.join, 1, sep="+").result(timeout=30) == "1+b"
    assert pool.submit(funcs.join, a="x", b="y", sep="/").result(timeout=30) == "x/y"
    assert pool.broadcast(funcs.join, "x", b="z", sep=":") == ["x:z", "x:z"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        pool.submit(funcs.join, 1, nope=2).result(timeout=30)


def test_map_takes_positional_iterables_and_no_keyword_arguments_as_the_stdlib_executors_do(pool):
    assert list(pool.map(funcs.join, "ab", "cd")) == ["a-c", "b-d"]
    with cf.ThreadPoolExecutor(1) as stdlib, pytest.raises(TypeError, match="unexpected keyword argument 'sep'"):
        stdlib.map(funcs.join, "ab", sep="+")
    with pytest.raises(TypeError, match="unexpected keyword argument 'sep'"):
        pool.map(funcs.join, "ab", sep="+")


def _tensors():
    import torch

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "contiguous": (base.clone(), True),
        "transposed": (base.clone().t(), False),
        "sliced columns": (base.clone()[:, 1:3], False),
        "requires_grad": (base.clone().requires_grad_(True), False),
    }


@pytest.mark.parametrize("kind", ["contiguous", "transposed", "sliced columns", "requires_grad"])
def test_tensors_that_cannot_be_shared_in_place_cross_as_copies(ns_pool, kind):
    t, shared = _tensors()[kind]
    before = t.detach().clone()
    storage = t.untyped_storage()
    ptr, requires_grad, contiguous, stride, values = ns_pool.submit(funcs.tensor_seen_inside, t, False).result()
    assert values == before.tolist()
    assert (requires_grad, contiguous) == (t.requires_grad, t.is_contiguous())
    inside_host_storage = storage.data_ptr() <= ptr < storage.data_ptr() + storage.nbytes()
    assert inside_host_storage is shared
    ns_pool.submit(funcs.tensor_seen_inside, t, True).result()  # adds 1 in place, inside
    assert t.detach().tolist() == ((before + 1) if shared else before).tolist()
    back = ns_pool.submit(funcs.echo, t).result()
    assert back.detach().tolist() == t.detach().tolist() and back.requires_grad == t.requires_grad
    assert back.stride() == t.stride() or back.is_contiguous()


# -- errors ----------------------------------------------------------------------------------------


def test_an_exception_is_raised_as_its_own_type_with_the_remote_traceback_as_its_cause(pool):
    with pytest.raises(ValueError, match="bad input 42") as info:
        pool.submit(funcs.fail, "bad input 42").result()
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail" in str(cause) and "raise ValueError" in str(cause)
    assert remote_traceback(info.value) == str(cause)
    assert pool.broadcast(funcs.echo, 7) == [7, 7]  # both interpreters keep serving


def test_an_exception_that_cannot_be_re_created_in_the_caller_is_a_remote_error_with_its_text(ns_pool):
    with pytest.raises(RemoteError) as info:
        ns_pool.submit(funcs.fail_with_a_lock).result(timeout=30)
    err = info.value
    assert err.remote_type == "testmodels.runtime_funcs.HoldsALock" and "refused" in err.remote_message
    assert "in fail_with_a_lock" in err.remote_traceback and remote_traceback(err) == err.remote_traceback
    assert ns_pool.submit(funcs.echo, 1).result(timeout=30) == 1


def test_a_result_that_cannot_be_pickled_is_an_error_not_a_hang(ns_pool):
    with pytest.raises(TypeError, match="cannot be sent back"):
        ns_pool.submit(funcs.unpicklable_result).result(timeout=30)
    assert ns_pool.submit(funcs.echo, 1).result(timeout=30) == 1


def test_functions_that_cannot_travel_are_refused_with_the_reason(pool):
    with pytest.raises(TypeError, match="lambda or a local function"):
        pool.submit(lambda: 1).result(timeout=30)

    def local():
        return 1

    with pytest.raises(TypeError, match="module level"):
        pool.submit(local).result(timeout=30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_initializer_breaks_the_pool_at_construction_with_its_cause(backend):
    held = interpreters_alive() - interpreters_parked()
    with pytest.raises(BrokenInterpreterPool, match="initializer .*fail.* failed: no model here") as info:
        InterpreterPool(2, backend=backend, initializer=funcs.fail, initargs=("no model here",))
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and str(cause) == "no model here"
    assert "in fail" in remote_traceback(cause)
    assert interpreters_alive() - interpreters_parked() == held  # its interpreters were given back


def test_size_must_be_positive():
    with pytest.raises(ValueError, match="size must be greater than 0"):
        InterpreterPool(0)


def test_more_interpreters_than_glibc_allows_is_refused_before_any_starts():
    alive = interpreters_alive()
    with pytest.raises(ValueError, match="at most 15"):
        InterpreterPool(16, backend="namespaces")
    assert interpreters_alive() == alive


def test_missing_static_tls_setting_is_a_clear_error():
    env = {k: v for k, v in subprocess_env().items() if k != "GLIBC_TUNABLES"}
    proc = run_python(
        """
        from tenfold.runtime import InterpreterPool
        try:
            InterpreterPool(2, backend="namespaces")
        except ValueError as exc:
            print(exc)
        """,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "GLIBC_TUNABLES" in proc.stdout and "before the process starts" in proc.stdout
    assert "glibc.rtld.optional_static_tls=" in proc.stdout


def test_submit_after_shutdown_raises_and_shutdown_twice_is_fine():
    p = InterpreterPool(1)
    p.shutdown()
    p.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        p.submit(funcs.echo, 1)


# -- executor behaviour ------------------------------------------------------------------------------


def test_wait_and_as_completed_work_with_its_futures(pool):
    futures = [pool.submit(funcs.echo, i) for i in range(20)]
    done, not_done = cf.wait(futures, timeout=60)
    assert len(done) == 20 and not not_done
    assert sorted(f.result() for f in cf.as_completed(futures)) == list(range(20))


def test_map_is_lazy_in_order_and_honours_timeout(pool):
    assert list(pool.map(funcs.echo, range(10))) == list(range(10))
    results = pool.map(funcs.slow_where, [1.0, 1.0, 1.0], timeout=0.3)
    with pytest.raises(cf.TimeoutError):
        list(results)
    # The calls already running go on past the timeout: wait for them (a broadcast queues behind them), so
    # that the next test finds an idle pool.
    pool.broadcast(funcs.echo, None)


def test_shutdown_with_cancel_futures_cancels_what_is_queued():
    r, w = os.pipe()
    p = InterpreterPool(1)
    try:
        running = p.submit(funcs.read_byte, r)  # runs until the byte below is written
        queued = [p.submit(funcs.echo, i) for i in range(20)]
        wait_for(running.running, 30, "the first call to start")
        p.shutdown(wait=False, cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        assert not running.done()
    finally:
        os.write(w, b"x")
        p.shutdown(wait=True)
        os.close(r)
        os.close(w)
    assert running.result(timeout=30) == b"x"


@pytest.mark.parametrize("backend", BACKENDS)
def test_shutdown_with_cancel_futures_runs_the_calls_idle_interpreters_took_as_the_stdlib_executors_do(backend):
    # CPython's test_cancel_futures, with the stricter claim the pool can make: each idle interpreter takes the
    # first call submitted to it, which runs to its end.
    p = InterpreterPool(2, backend=backend)
    fs = [p.submit(time.sleep, 0.1) for _ in range(50)]
    assert not fs[0].cancel() and not fs[1].cancel()  # taken: running, as a stdlib worker's
    p.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    others = [f for f in fs if not f.cancelled()]
    assert len(cancelled) > 20
    assert len(others) >= 2 and fs[0] in others and fs[1] in others
    for f in others:
        assert f.done() and f.exception() is None


def test_no_reference_to_arguments_or_results_outlives_the_call(pool):
    import torch  # noqa: F401 - with torch loaded the host pickles through its tensor-aware pickler

    box = funcs.Box(5)
    ref = weakref.ref(box)
    assert pool.submit(funcs.unbox, box).result() == 5
    del box
    gc.collect()
    assert ref() is None
    future = pool.submit(funcs.make_box, 3)
    result_ref = weakref.ref(future.result())
    del future
    gc.collect()
    assert result_ref() is None


def test_shut_down_pools_hand_their_interpreters_to_the_next_pool():
    with InterpreterPool(2, backend="namespaces") as p:
        p.broadcast(funcs.echo, 0)
    alive = interpreters_alive()
    for _ in range(20):
        with InterpreterPool(2, backend="namespaces") as p:
            assert p.broadcast(funcs.echo, 1) == [1, 1]
    assert interpreters_alive() == alive


def test_a_new_pool_starts_its_interpreters_with_its_own_sys_path():
    marker = "/nonexistent/tenfold-test-path"
    sys.path.append(marker)
    try:
        with InterpreterPool(2, backend="namespaces") as p:
            assert all(marker in path for path in p.broadcast(funcs.get_path))
    finally:
        sys.path.remove(marker)


# -- zero copy -------------------------------------------------------------------------------------


def test_numpy_arrays_are_seen_in_place_and_read_only_stays_read_only(ns_pool):
    a = np.arange(1 << 20, dtype=np.float64)
    addr, writeable = ns_pool.submit(funcs.numpy_address, a).result()
    assert addr == a.ctypes.data and writeable
    a.flags.writeable = False
    addr, writeable = ns_pool.submit(funcs.numpy_address, a).result()
    assert addr == a.ctypes.data and not writeable
    doubled = ns_pool.submit(funcs.double_numpy, a).result()
    assert np.array_equal(doubled, a * 2) and doubled.flags.writeable


def test_torch_tensors_and_arrow_arrays_are_seen_in_place(ns_pool):
    import pyarrow as pa
    import torch

    t = torch.arange(1 << 18, dtype=torch.float32)
    assert ns_pool.submit(funcs.torch_address, t).result() == t.data_ptr()
    back = ns_pool.submit(funcs.double_tensor, t).result()
    assert torch.equal(back, t * 2) and back.data_ptr() != t.data_ptr()
    arr = pa.array(np.arange(1000, dtype=np.int64))
    assert ns_pool.submit(funcs.arrow_address, arr).result() == arr.buffers()[1].address


# -- threads, interrupts, stats --------------------------------------------------------------------


def test_each_interpreter_gets_its_share_of_cores_before_torch_is_imported():
    with InterpreterPool(2, backend="namespaces", threads_per_interpreter=1) as p:
        assert p.broadcast(funcs.torch_threads) == [("1", 1), ("1", 1)]


def test_an_interrupt_sent_as_soon_as_a_call_is_handed_over_stops_it_once_it_starts(pool):
    # Taken by an idle interpreter at submit, the call is running for the caller before the interpreter has
    # begun it: the interrupt waits for it to begin, and never mistakes it for a stuck one.
    for _ in range(20):
        f = pool.submit(funcs.spin)
        assert pool.interrupt(f, grace_s=2.0)
        with pytest.raises(TimeoutError):
            f.result(timeout=10)
    assert pool.healthy == pool.size and pool.submit(funcs.echo, 5).result(timeout=30) == 5


def test_a_runaway_python_loop_is_interrupted_and_the_interpreter_serves_again(pool):
    f = pool.submit(funcs.spin)
    wait_for(f.running, 10, "the loop to start", interval_s=0.01)
    assert pool.interrupt(f, grace_s=2.0)
    with pytest.raises(TimeoutError) as info:
        f.result(timeout=5)
    assert "in spin" in remote_traceback(info.value)
    assert pool.broadcast(funcs.echo, 2) == [2, 2]
    assert pool.healthy == 2


@pytest.mark.own_process
def test_a_call_stuck_in_native_code_loses_its_interpreter_and_the_rest_serve():
    r, w = os.pipe()
    with InterpreterPool(2, backend="namespaces") as p:
        try:
            f = p.submit(funcs.read_byte, r)
            wait_blocked_reading(r)
            assert p.interrupt(f, grace_s=0.3) is False
            with pytest.raises(InterpreterLost):
                f.result(timeout=1)
            stats = p.stats()
            assert stats.healthy == 1 and [i.lost for i in stats.interpreters].count(True) == 1
            assert [p.submit(funcs.echo, i).result(timeout=10) for i in range(4)] == [0, 1, 2, 3]
        finally:
            os.write(w, b"x")  # the stuck call returns: nothing is left blocked when the pool shuts down
            os.close(r)
            os.close(w)


@pytest.mark.own_process
def test_calls_queued_on_a_lost_interpreter_complete_on_the_others():
    stuck_r, stuck_w = os.pipe()
    busy_r, busy_w = os.pipe()
    with InterpreterPool(2, backend="namespaces") as p:
        try:
            start = [i.calls for i in p.stats().interpreters]
            stuck = p.submit(funcs.read_byte, stuck_r)  # native code: an interrupt cannot stop it
            busy = p.submit(funcs.read_byte, busy_r)
            queued = [p.submit(funcs.echo, i) for i in range(6)]
            wait_blocked_reading(stuck_r)
            wait_blocked_reading(busy_r)
            depths = [i.queue_depth for i in p.stats().interpreters]
            assert depths == [4, 4]  # each interpreter: its blocked call and 3 queued behind it
            assert p.interrupt(stuck, grace_s=0.3) is False
            lost = [i.lost for i in p.stats().interpreters]
            assert lost.count(True) == 1
            os.write(busy_w, b"x")  # the other interpreter goes on: its own 3, then the 3 moved to it
            assert [f.result(timeout=30) for f in queued] == list(range(6))
            assert busy.result(timeout=30) == b"x"
            with pytest.raises(InterpreterLost):
                stuck.result(timeout=1)
            served = [i.calls - n for i, n in zip(p.stats().interpreters, start)]
            assert served[lost.index(True)] == 0 and served[lost.index(False)] == 7
        finally:
            os.write(stuck_w, b"x")
            for fd in (stuck_r, stuck_w, busy_r, busy_w):
                os.close(fd)


def test_calls_waiting_behind_an_interrupted_call_move_to_the_others_without_waiting_out_its_grace():
    stuck_r, stuck_w = os.pipe()
    with InterpreterPool(2, backend="namespaces") as p:
        try:
            start = [i.calls for i in p.stats().interpreters]
            stuck = p.submit_to(0, funcs.read_byte, stuck_r)  # blocked in native code until a byte comes
            wait_blocked_reading(stuck_r)
            behind = [p.submit_to(0, funcs.echo, i) for i in range(3)]
            outcome: list[bool] = []
            interrupting = threading.Thread(target=lambda: outcome.append(p.interrupt(stuck, grace_s=10.0)))
            interrupting.start()
            # Answered by the other interpreter while the first still waits for its call to return.
            assert [f.result(timeout=5) for f in behind] == [0, 1, 2]
            assert [p.submit(funcs.echo, i).result(timeout=5) for i in range(3, 6)] == [3, 4, 5]
            assert interrupting.is_alive()
            assert [i.calls - n for i, n in zip(p.stats().interpreters, start)] == [0, 6]
            os.write(stuck_w, b"x")  # the call returns within its grace: its interpreter is kept, and serves again
            interrupting.join(timeout=10)
            assert outcome == [True] and stuck.done() and p.healthy == 2
            assert p.submit_to(0, funcs.echo, 6).result(timeout=5) == 6
        finally:
            for fd in (stuck_r, stuck_w):
                os.close(fd)



def test_stats_report_busy_time_queue_depth_and_utilization():
    with InterpreterPool(2, backend="namespaces", utilization_window_s=2.0) as p:
        futures = [p.submit(funcs.slow_where, 0.4) for _ in range(6)]
        assert p.stats().queue_depth >= 4
        cf.wait(futures)
        stats = p.stats()
        assert stats.calls >= 6 and stats.errors == 0
        assert stats.busy_s >= 6 * 0.4 * 0.9
        assert stats.utilization > 0.5
        wait_for(lambda: p.stats().utilization < 0.2, 5, "utilization to fall once the 2 s window is idle")


# -- process lifetime ------------------------------------------------------------------------------


@pytest.mark.parametrize("shutdown", [True, False])
@pytest.mark.parametrize("host_torch", [True, False])
def test_a_process_using_a_pool_exits_cleanly(shutdown, host_torch):
    proc = run_python(
        f"""
        if {host_torch}:
            import torch
        from testmodels import runtime_funcs as funcs
        from tenfold.runtime import InterpreterPool
        p = InterpreterPool(2, backend="namespaces")
        assert p.broadcast(funcs.torch_threads)[0][1] >= 1
        if {shutdown}:
            p.shutdown()
        print("done")
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "done"
    assert "double free" not in proc.stderr and "Segmentation" not in proc.stderr


def test_a_pool_that_takes_parked_interpreters_finds_the_modules_and_state_the_last_one_left():
    proc = run_python(
        """
        import json
        from testmodels import runtime_funcs as funcs
        from tenfold.runtime import InterpreterPool, interpreters_alive
        with InterpreterPool(2, backend="namespaces") as p:
            before = p.broadcast(funcs.has_module, "colorsys")
            p.broadcast(funcs.load_module, "colorsys")
            first = p.broadcast(funcs.bump)
        with InterpreterPool(2, backend="namespaces") as p:
            kept = p.broadcast(funcs.has_module, "colorsys")
            second = p.broadcast(funcs.bump)
        print(json.dumps([before, kept, first, second, interpreters_alive()]))
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, kept, first, second, alive = json.loads(proc.stdout)
    assert before == [False, False] and kept == [True, True]
    assert first == [1, 1] and second == [2, 2]  # the module's globals went on from where they were
    assert alive == 2  # the second pool started no interpreter of its own


def test_the_cap_of_15_interpreters_holds_across_live_pools_and_parked_ones_count_towards_it():
    proc = run_python(
        """
        import json, os
        from tenfold.runtime import InterpreterPool, interpreters_alive
        pools = [InterpreterPool(5, backend="namespaces") for _ in range(3)]
        full = interpreters_alive()
        try:
            InterpreterPool(1, backend="namespaces")
            refused = None
        except ValueError as exc:
            refused = str(exc)
        after_refusal = interpreters_alive()
        pools[0].shutdown()  # its 5 are parked, still alive: the next pool of 5 takes them
        again = InterpreterPool(5, backend="namespaces")
        pids = again.broadcast(os.getpid)
        print(json.dumps([full, refused, after_refusal, interpreters_alive(), pids == [os.getpid()] * 5]))
        """,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    full, refused, after_refusal, alive, served = json.loads(proc.stdout)
    assert full == 15 and after_refusal == 15 and alive == 15 and served
    assert refused is not None and "15 are already alive" in refused and "at most 15" in refused



def _signal_state(pid: int) -> str:
    lines = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/task/{tid}/wchan") as f:
            wchan = f.read()
        lines.append(f"{tid} {status['Name'].strip()} blocked={status['SigBlk'].strip()} "
                     f"ignored={status['SigIgn'].strip()} caught={status['SigCgt'].strip()} in {wchan}")
    return "\n".join(lines)


def test_ctrl_c_still_interrupts_the_host():
    code = textwrap.dedent(
        """
        import sys
        from testmodels import runtime_funcs as funcs
        from tenfold.runtime import InterpreterPool
        p = InterpreterPool(1, backend="namespaces")
        f = p.submit(funcs.spin)
        print("ready", flush=True)
        try:
            f.result()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        wait_blocked("futex", pid=proc.pid, main_thread=True)  # in f.result(), waiting
        proc.send_signal(2)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit 30 s after Ctrl-C; the child's signal state and threads:\n{_signal_state(proc.pid)}")
    finally:
        proc.kill()  # never leave a spinning interpreter behind, whatever failed
        proc.wait()
    assert "interrupted" in out and proc.returncode == 3


def test_threads_backend_shares_the_host_interpreter():
    with InterpreterPool(2, backend="threads") as p:
        assert {m for _, _, m in p.broadcast(funcs.where)} == {id(sys.modules)}
        assert threading.get_ident() not in {t for _, t, _ in p.broadcast(funcs.where)}


# -- platforms -------------------------------------------------------------------------------------


def test_without_a_shared_libpython_auto_falls_back_to_threads_and_namespaces_says_how_to_fix(monkeypatch):
    import sysconfig

    from tenfold.runtime import PlatformNotSupported, _glibc

    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: 0 if name == "Py_ENABLE_SHARED" else real(name))
    _glibc.libpython_path.cache_clear()
    try:
        with pytest.raises(PlatformNotSupported, match="--enable-shared"):
            InterpreterPool(1, backend="namespaces")
        with pytest.warns(RuntimeWarning, match="falls back to the threads backend"):
            p = InterpreterPool(1, backend="auto")
        with p:
            assert p.backend == "threads" and p.submit(funcs.echo, 3).result() == 3
    finally:
        _glibc.libpython_path.cache_clear()


# requires-python sets no upper bound: the newest CPython release this project claims to run on.
NEWEST_CLAIMED_PYTHON = (3, 13)


def claimed_pythons() -> list[str]:
    """Every minor version from pyproject.toml's requires-python minimum to NEWEST_CLAIMED_PYTHON that its
    specifier admits, but the one running the tests (the whole suite checks that one)."""
    import re

    from packaging.specifiers import SpecifierSet

    text = (ROOT / "pyproject.toml").read_text()
    spec = SpecifierSet(re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.M).group(1))
    lowest = min(int(s.version.split(".")[1]) for s in spec if s.operator in (">=", "~=", "=="))
    versions = [f"3.{minor}" for minor in range(lowest, NEWEST_CLAIMED_PYTHON[1] + 1)]
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [v for v in versions if spec.contains(f"{v}.0") and v != running]


def find_python(version: str) -> str | None:
    """A working python`version` on PATH or among pyenv's versions, else None."""
    import glob
    import shutil

    candidates = [shutil.which(f"python{version}")]
    pyenv = shutil.which("pyenv")
    roots = [os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv")]
    if pyenv:
        roots.insert(0, subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip())
    for root in filter(None, roots):
        candidates += sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")))
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


def test_the_claimed_pythons_follow_requires_python():
    assert "3.10" in claimed_pythons() or sys.version_info[:2] == (3, 10)
    assert f"{NEWEST_CLAIMED_PYTHON[0]}.{NEWEST_CLAIMED_PYTHON[1]}" in claimed_pythons()


@pytest.mark.parametrize("version", claimed_pythons())
def test_the_runtime_runs_on_every_python_this_project_claims(version):
    exe = find_python(version)
    how = (f"install it with `PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install {version}` (namespace "
           f"interpreters need a shared libpython), or put a python{version} built with --enable-shared on PATH")
    if exe is None:
        pytest.fail(f"python{version} is claimed by requires-python but not installed here: {how}")
    proc = subprocess.run(
        [exe, "-c", "import os, sys; from tenfold.runtime import InterpreterPool\n"
         "with InterpreterPool(2, backend='namespaces') as p: print(p.broadcast(os.getpid) == [os.getpid()] * 2)"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0 and "--enable-shared" in proc.stderr:
        pytest.fail(f"{exe} has no shared libpython: {how}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True"


def test_a_pool_dropped_without_shutdown_gives_its_interpreters_back():
    from tenfold.runtime.pool import interpreters_parked

    p = InterpreterPool(2, backend="namespaces")
    assert p.submit(funcs.echo, 1).result() == 1
    parked = interpreters_parked()
    del p
    gc.collect()
    deadline = time.monotonic() + 10
    while interpreters_parked() < parked + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert interpreters_parked() == parked + 2



def test_a_tensor_made_only_while_pickling_the_result_comes_back_intact(ns_pool):
    import torch

    for _ in range(20):
        assert torch.equal(ns_pool.submit(funcs.ephemeral_tensor).result(), torch.arange(1000, dtype=torch.float32))


def test_a_rolling_setup_runs_in_one_interpreter_at_a_time_while_the_others_take_calls(ns_pool):
    r, w = os.pipe()
    tokens = []
    try:
        # Each interpreter's setup blocks until a byte arrives: run in all at once (add_setup), none could answer.
        rolling = threading.Thread(target=lambda: tokens.append(ns_pool.add_rolling_setup(funcs.read_byte, r)),
                                   daemon=True)
        rolling.start()
        for index in range(ns_pool.size):
            wait_for(lambda i=index: [s.queue_depth for s in ns_pool.stats().interpreters] ==
                     [int(j == i) for j in range(ns_pool.size)], 30, f"the setup to run in interpreter {index} alone")
            wait_blocked_reading(r)
            # The others take calls meanwhile.
            assert ns_pool.submit(funcs.echo, index).result(timeout=30) == index
            os.write(w, b"x")
        rolling.join(30)
        assert not rolling.is_alive() and len(tokens) == 1
    finally:
        for token in tokens:
            ns_pool.remove_setup(token)
        os.close(r)
        os.close(w)
