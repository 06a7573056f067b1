"""A lost interpreter is replaced in place while the process has room: set up like the others, in service
again without a new pool; with no room left, the place stays lost and says why."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from support import run_python, wait_blocked_reading, wait_for
from testmodels import runtime_funcs as funcs
from testmodels import setup_funcs

from tenfold.runtime import InterpreterPool


@contextlib.contextmanager
def one_lost(pool: InterpreterPool) -> Iterator[None]:
    """Lose one of `pool`'s interpreters: a call blocked in native code past an interrupt's grace. The call
    returns on exit (the lost interpreter's thread ends, and the pool can shut down at once)."""
    r, w = os.pipe()
    try:
        stuck = pool.submit(funcs.read_byte, r)
        wait_blocked_reading(r)
        assert pool.interrupt(stuck, grace_s=0.3) is False  # stuck in native code: its interpreter is lost
        yield
    finally:
        os.write(w, b"x")  # a read blocked on r keeps its file open, and returns this byte
        os.close(r)
        os.close(w)


@pytest.mark.own_process
@pytest.mark.parametrize("backend", ["namespaces", "threads"])
def test_a_lost_interpreter_is_replaced_and_runs_the_setups_before_taking_calls(backend: str) -> None:
    loaded = f"model loaded {uuid.uuid4()}"
    with InterpreterPool(2, backend=backend) as pool:
        pool.add_setup(setup_funcs.mark, loaded)
        before = set(pool.broadcast(setup_funcs.modules_id))
        t0 = time.monotonic()
        with one_lost(pool):
            stats = wait_for(lambda: (s := pool.stats()).healthy == 2 and s.replaced == 1 and s, 5,
                             "the lost interpreter replaced")
            assert time.monotonic() - t0 < 5.0
            assert [i.replaced for i in stats.interpreters].count(1) == 1
            assert not any(i.lost for i in stats.interpreters)
            assert stats.as_dict()["replaced"] == 1
            if backend == "namespaces":
                after = set(pool.broadcast(setup_funcs.modules_id))
                assert len(after) == 2 and len(after & before) == 1, "one interpreter is new, with modules of its own"
                marks = pool.broadcast(setup_funcs.read_marks)
                assert [m.count(loaded) for m in marks] == [1, 1]  # the setup ran in the new one too, once
            assert [pool.submit(setup_funcs.sleep_in_c, 0).result(timeout=10) for _ in range(4)] == [0] * 4


@pytest.mark.own_process
def test_a_removed_setup_does_not_run_in_a_replacement() -> None:
    old, kept = f"old model {uuid.uuid4()}", f"kept {uuid.uuid4()}"
    with InterpreterPool(2, backend="namespaces") as pool:
        token = pool.add_setup(setup_funcs.mark, old)
        pool.add_setup(setup_funcs.mark, kept)
        pool.remove_setup(token)
        with one_lost(pool):
            wait_for(lambda: pool.stats().replaced == 1, 5, "the replacement")
            marks = pool.broadcast(setup_funcs.read_marks)
            assert [m.count(kept) for m in marks] == [1, 1]
            assert sorted(m.count(old) for m in marks) == [0, 1], "the survivor ran it; the replacement did not"


def test_without_room_for_another_interpreter_the_place_stays_lost_and_says_why() -> None:
    run = run_python("""
        import os
        from support import wait_blocked_reading, wait_for
        from testmodels import runtime_funcs as funcs
        from tenfold.runtime import InterpreterPool
        r, w = os.pipe()
        with InterpreterPool(15, backend="namespaces") as pool:  # every namespace glibc allows
            stuck = pool.submit(funcs.read_byte, r)
            wait_blocked_reading(r)
            assert pool.interrupt(stuck, grace_s=0.3) is False
            wait_for(lambda: any(s.replace_error for s in pool._slots if s.lost), 10, "the replacement to give up")
            stats = pool.stats()
            print(stats.healthy, stats.replaced, [s.replace_error for s in pool._slots if s.lost])
            os.write(w, b"x")
    """, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    healthy, replaced, errors = run.stdout.strip().split(" ", 2)
    assert (healthy, replaced) == ("14", "0") and "at most 15" in errors, run.stdout


@pytest.mark.own_process
def test_replace_lost_can_be_turned_off() -> None:
    with InterpreterPool(2, backend="namespaces", replace_lost=False) as pool, one_lost(pool):
        # A replacement starts (on a thread of its own) before interrupt returns, and takes far longer than this.
        assert not [t.name for t in threading.enumerate() if t.name.startswith("tenfold-replace")]
        assert (pool.stats().healthy, pool.stats().replaced) == (1, 0)
