"""A lost interpreter is replaced in place while the process has room: set up like the others, in service
again without a new pool; with no room left, the place stays lost and says why."""

from __future__ import annotations

import time
import uuid

import pytest
from support import run_python, wait_for
from testmodels import setup_funcs

from tenfold.runtime import InterpreterPool


def _lose_one(pool: InterpreterPool) -> None:
    stuck = pool.submit(setup_funcs.sleep_in_c, 4.0)
    wait_for(stuck.running, 5, "the call running")
    time.sleep(0.1)  # inside the sleep, past the interpreter's eval loop
    assert pool.interrupt(stuck, grace_s=0.3) is False  # stuck in native code: its interpreter is lost


@pytest.mark.parametrize("backend", ["namespaces", "threads"])
def test_a_lost_interpreter_is_replaced_and_runs_the_setups_before_taking_calls(backend: str) -> None:
    loaded = f"model loaded {uuid.uuid4()}"  # interpreters outlive pools: marks of other tests may be there
    with InterpreterPool(2, backend=backend) as pool:
        pool.add_setup(setup_funcs.mark, loaded)
        before = set(pool.broadcast(setup_funcs.modules_id))
        t0 = time.monotonic()
        _lose_one(pool)
        stats = wait_for(lambda: (s := pool.stats()).healthy == 2 and s.replaced == 1 and s, 5,
                         "the lost interpreter replaced")
        assert time.monotonic() - t0 < 5.0
        assert [i.replaced for i in stats.interpreters].count(1) == 1 and not any(i.lost for i in stats.interpreters)
        assert stats.as_dict()["replaced"] == 1
        if backend == "namespaces":
            after = set(pool.broadcast(setup_funcs.modules_id))
            assert len(after) == 2 and len(after & before) == 1, "one interpreter is new, with modules of its own"
            marks = pool.broadcast(setup_funcs.read_marks)
            assert [m.count(loaded) for m in marks] == [1, 1]  # the setup ran in the new one too, once
        assert [pool.submit(setup_funcs.sleep_in_c, 0).result(timeout=10) for _ in range(4)] == [0] * 4
        time.sleep(4)  # the lost call ends on its own before the pool is parked


def test_a_removed_setup_does_not_run_in_a_replacement() -> None:
    old, kept = f"old model {uuid.uuid4()}", f"kept {uuid.uuid4()}"
    with InterpreterPool(2, backend="namespaces") as pool:
        token = pool.add_setup(setup_funcs.mark, old)
        pool.add_setup(setup_funcs.mark, kept)
        pool.remove_setup(token)
        _lose_one(pool)
        wait_for(lambda: pool.stats().replaced == 1, 5, "the replacement")
        marks = pool.broadcast(setup_funcs.read_marks)
        assert [m.count(kept) for m in marks] == [1, 1]
        assert sorted(m.count(old) for m in marks) == [0, 1], "the survivor ran it; the replacement did not"
        time.sleep(4)


def test_without_room_for_another_interpreter_the_place_stays_lost_and_says_why() -> None:
    run = run_python("""
        import time
        from testmodels import setup_funcs
        from tenfold.runtime import InterpreterPool
        with InterpreterPool(15, backend="namespaces") as pool:  # every namespace glibc allows
            stuck = pool.submit(setup_funcs.sleep_in_c, 3.0)
            time.sleep(0.3)
            assert pool.interrupt(stuck, grace_s=0.3) is False
            time.sleep(1.0)
            stats = pool.stats()
            print(stats.healthy, stats.replaced, [s.replace_error for s in pool._slots if s.lost])
            time.sleep(3)
    """, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    healthy, replaced, errors = run.stdout.strip().split(" ", 2)
    assert (healthy, replaced) == ("14", "0") and "at most 15" in errors, run.stdout


def test_replace_lost_can_be_turned_off() -> None:
    with InterpreterPool(2, backend="namespaces", replace_lost=False) as pool:
        _lose_one(pool)
        time.sleep(1.5)
        assert (pool.stats().healthy, pool.stats().replaced) == (1, 0)
        time.sleep(3)
