"""InterpreterPool: behaves as a concurrent.futures executor, runs calls in isolated interpreters."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest
from support import ROOT, run_python, subprocess_env
from testmodels import runtime_funcs as funcs

from tenfold.runtime import (
    InterpreterLost,
    InterpreterPool,
    RemoteTraceback,
    interpreters_alive,
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
    before = [i.calls for i in pool.stats().interpreters]
    idents = pool.broadcast(funcs.slow_where, 0.0)
    after = [i.calls for i in pool.stats().interpreters]
    assert len(set(idents)) == 2
    assert [b - a for a, b in zip(before, after)] == [1, 1]


# -- correctness under concurrency -------------------------------------------------------------------


def test_many_concurrent_submitters_get_their_own_results(pool):
    def submitter(k: int) -> list:
        futures = [pool.submit(funcs.echo, (k, i)) for i in range(500)]
        return [f.result(timeout=120) for f in futures]

    with cf.ThreadPoolExecutor(8) as clients:
        results = list(clients.map(submitter, range(8)))
    for k, got in enumerate(results):
        assert got == [(k, i) for i in range(500)]


# -- errors ----------------------------------------------------------------------------------------


def test_an_exception_is_raised_as_its_own_type_with_the_remote_traceback_as_its_cause(pool):
    with pytest.raises(ValueError, match="bad input 42") as info:
        pool.submit(funcs.fail, "bad input 42").result()
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail" in str(cause) and "raise ValueError" in str(cause)
    assert remote_traceback(info.value) == str(cause)
    assert pool.broadcast(funcs.echo, 7) == [7, 7]  # both interpreters keep serving


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


def test_shutdown_with_cancel_futures_cancels_what_is_queued():
    p = InterpreterPool(1)
    running = p.submit(funcs.slow_where, 0.5)
    queued = [p.submit(funcs.echo, i) for i in range(20)]
    time.sleep(0.1)
    p.shutdown(wait=True, cancel_futures=True)
    assert running.result() is not None
    assert all(f.cancelled() for f in queued)


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


def test_a_runaway_python_loop_is_interrupted_and_the_interpreter_serves_again(pool):
    f = pool.submit(funcs.spin)
    time.sleep(0.3)
    assert pool.interrupt(f, grace_s=2.0)
    with pytest.raises(TimeoutError) as info:
        f.result(timeout=5)
    assert "in spin" in remote_traceback(info.value)
    assert pool.broadcast(funcs.echo, 2) == [2, 2]
    assert pool.healthy == 2


def test_a_call_stuck_in_native_code_loses_its_interpreter_and_the_rest_serve():
    with InterpreterPool(2, backend="namespaces") as p:
        f = p.submit(time.sleep, 3)
        time.sleep(0.2)
        assert p.interrupt(f, grace_s=0.3) is False
        with pytest.raises(InterpreterLost):
            f.result(timeout=1)
        stats = p.stats()
        assert stats.healthy == 1 and [i.lost for i in stats.interpreters].count(True) == 1
        assert [p.submit(funcs.echo, i).result(timeout=10) for i in range(4)] == [0, 1, 2, 3]
        time.sleep(3)  # let the sleeping call end before the pool is parked


def test_stats_report_busy_time_queue_depth_and_utilization():
    with InterpreterPool(2, backend="namespaces", utilization_window_s=2.0) as p:
        futures = [p.submit(funcs.slow_where, 0.4) for _ in range(6)]
        time.sleep(0.2)
        busy = p.stats()
        assert busy.queue_depth >= 4
        cf.wait(futures)
        stats = p.stats()
        assert stats.calls >= 6 and stats.errors == 0
        assert stats.busy_s >= 6 * 0.4 * 0.9
        assert stats.utilization > 0.5
        time.sleep(2.5)
        assert p.stats().utilization < 0.2


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
        time.sleep(0.3)
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=30)
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


def _find_python(version: str) -> str | None:
    import glob
    import shutil

    candidates = [shutil.which(f"python{version}")]
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        candidates += sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")))
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_the_runtime_runs_on_other_pythons_found_on_this_machine(version):
    exe = _find_python(version)
    if exe is None:
        pytest.skip(f"python{version} is not installed here")
    proc = subprocess.run(
        [exe, "-c", "import os, sys; from tenfold.runtime import InterpreterPool\n"
         "with InterpreterPool(2, backend='namespaces') as p: print(p.broadcast(os.getpid) == [os.getpid()] * 2)"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0 and "--enable-shared" in proc.stderr:
        pytest.skip(f"python{version} has no shared libpython")
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
