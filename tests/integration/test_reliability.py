"""Serving that survives load and faults, on a real local Ray Serve over HTTP.

Hung calls (a Python loop, a native sleep), interpreters lost or stuck, failed health checks, a
segfaulting model, request limits and a clean replica shutdown (its log checked for crashes). Each
application is deleted when its test ends, also on failure. The soak is in tests/bench/test_soak.py.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from support import pid_alive, running_replicas, wait_for
from testmodels import reliability_models as models

from tenfold.integration import codec

pytestmark = pytest.mark.ray

TIMEOUT_S = 1.0  # request_timeout_s of the fault apps
CRASH_MARKS = ("double free", "Segmentation fault", "Fatal Python error", "core dumped", "corrupted")
X = [[1.0, 2.0, 3.0, 4.0]]


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every model of testmodels/reliability_models.py packaged, by name."""
    from tenfold.packaging import save

    out = tmp_path_factory.mktemp("reliability")
    paths = {}
    for name, cls in models.MODELS.items():
        paths[name] = out / f"{name}.pt"
        save(cls, paths[name], example_inputs=models.example_inputs(), name=name)
    return paths


@contextmanager
def deployed(serve_session, name: str, args: dict) -> Iterator[str]:  # noqa: ANN001
    """Runs app `name` at route /`name` and yields its URL; deletes it afterwards, also on failure."""
    from ray import serve

    from tenfold.integration import app_builder

    serve.run(app_builder({"name": name, "num_cpus": 0.5, **args}), name=name, route_prefix=f"/{name}")
    try:
        yield f"{serve_session.url}/{name}"
    finally:
        serve.delete(name)


def sleeping(seconds: float) -> tuple[list, int]:
    """An input that sleeps `seconds` in native code, and the token it announces when it starts."""
    token = random.randrange(1, 2**24)  # exact in float32
    return [[models.SLEEP, seconds, float(token), 0]], token


def wait_started(*tokens: int) -> None:
    wait_for(lambda: all(models.started(t) for t in tokens), 30, "the sleeping calls to start")


def post(url: str, x: list, timeout: float = 60) -> requests.Response:
    return requests.post(url, json={"inputs": [x]}, timeout=timeout)


def stats(url: str) -> dict:
    return requests.get(f"{url}/-/stats", timeout=30).json()


def assert_healthy_answer(r: requests.Response, x: list = X) -> None:
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]), models.expected(x), rtol=1e-5)


# -- hung and lost calls -------------------------------------------------------------------------


def test_replicated_model_interrupt_cancels_a_queued_call_and_stops_a_running_loop(archives) -> None:
    from concurrent.futures import CancelledError

    from tenfold.packaging import replicate
    from tenfold.runtime import InterpreterPool, remote_traceback

    with InterpreterPool(1, threads_per_interpreter=1) as pool, replicate(pool, archives["hang"]) as model:
        import torch

        token = random.randrange(1, 2**24)
        hung = model.submit(torch.tensor([[models.HANG, 0, float(token), 0]]))
        queued = model.submit(torch.tensor(X))
        wait_started(token)
        assert not hung.done()
        assert model.interrupt(queued) is True
        with pytest.raises(CancelledError):
            queued.result(timeout=5)
        t0 = time.monotonic()
        assert model.interrupt(hung, grace_s=2.0) is True
        with pytest.raises(TimeoutError) as info:
            hung.result(timeout=5)
        assert "forward" in remote_traceback(info.value)  # stopped inside the model's loop
        np.testing.assert_allclose(model(torch.tensor(X)).numpy(), models.expected(X), rtol=1e-5)
        assert time.monotonic() - t0 < 1.0
        assert pool.healthy == 1 and pool.stats().errors == 1


def test_results_come_back_intact_from_every_interpreter(archives) -> None:
    # A result's tensor must outlive the host's copy of its buffer: freed early, its first bytes came
    # back as the interpreter's malloc free-list pointer.
    import torch

    from tenfold.packaging import replicate
    from tenfold.runtime import InterpreterPool

    with InterpreterPool(2, threads_per_interpreter=1) as pool, replicate(pool, archives["healthy"]) as model:
        for rows in (1, 2, 3, 1, 64):
            x = torch.arange(4 * rows, dtype=torch.float32).reshape(rows, 4)
            outputs = [f.result().numpy() for f in [model.submit(x) for _ in range(4)]]
            for y in outputs:
                np.testing.assert_allclose(y, models.expected(x.tolist()), rtol=1e-5)


LIMIT = 4096  # max_request_bytes of the hang app


@pytest.fixture(scope="module")
def hang_app(serve_session, archives) -> Iterator[str]:  # noqa: ANN001
    # One interpreter: the call after the hung one can only be served if that interpreter was freed.
    with deployed(serve_session, "hang", {"archive": str(archives["hang"]), "interpreters": 1,
                                          "request_timeout_s": TIMEOUT_S, "max_request_bytes": LIMIT}) as url:
        yield url


def test_a_python_loop_answers_504_and_its_interpreter_serves_again(hang_app: str) -> None:
    url = hang_app
    assert_healthy_answer(post(url, X))
    errors = stats(url)["errors"]
    t0 = time.monotonic()
    r = post(url, [[models.HANG, 0, 0, 0]])
    answered = time.monotonic() - t0
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["type"] == "Timeout" and f"request_timeout_s ({TIMEOUT_S:g} s)" in error["message"], error
    assert TIMEOUT_S <= answered < TIMEOUT_S + 1.0, f"504 after {answered:.2f} s"
    # One interpreter: this answer needs the loop stopped inside it (it would spin forever otherwise).
    assert_healthy_answer(post(url, X))
    s = stats(url)
    assert s["healthy"] == 1 and s["interpreters"][0]["lost"] is False
    assert s["errors"] == errors + 1  # the interrupted call failed with TimeoutError in its interpreter


def test_queue_past_max_queued_requests_is_a_503_with_retry_after(serve_session, archives) -> None:
    args = {"archive": str(archives["native_sleep"]), "interpreters": 1, "request_timeout_s": 10.0,
            "max_ongoing_requests": 1, "max_queued_requests": 1}
    with deployed(serve_session, "queued", args) as url:
        assert_healthy_answer(post(url, X))
        barrier = threading.Barrier(5)

        def call(_: int) -> requests.Response:
            barrier.wait()
            return post(url, [[models.SLEEP, 0.8, 0, 0]])

        with ThreadPoolExecutor(6) as clients:  # bounded: 6 requests, 1 running, 1 queued, the rest refused
            # The first is running before the others arrive: while the proxy is still placing it, it counts
            # as queued, and the queue's one place would not be left for a second.
            long, token = sleeping(2.0)
            first = clients.submit(post, url, long)
            wait_started(token)
            rest = [clients.submit(call, i) for i in range(5)]
            answers = [first.result(), *(f.result() for f in rest)]
        codes = sorted(r.status_code for r in answers)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        for r in answers:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1, r.headers
        assert_healthy_answer(post(url, X))  # refusals left the replica serving


def test_a_call_stuck_in_native_code_loses_its_interpreter_and_the_replica_is_replaced(serve_session,
                                                                                        archives) -> None:
    # Without replacement (or once the process has no room for another interpreter) the replica dies
    # with its last interpreter; replacement in place has its own test (test_durability.py).
    args = {"archive": str(archives["native_sleep"]), "interpreters": 2, "request_timeout_s": TIMEOUT_S,
            "health_check_period_s": 1.0, "health_check_timeout_s": 10.0, "replace_lost_interpreters": False}
    stuck = [[models.SLEEP, 15.0, 0, 0]]  # bounded: the sleeping threads end on their own
    with deployed(serve_session, "native", args) as url:
        pid = stats(url)["pid"]
        t0 = time.monotonic()
        r = post(url, stuck)
        assert r.status_code == 504 and time.monotonic() - t0 < TIMEOUT_S + 0.5, r.text
        # The interrupt cannot land in native code: after its grace the interpreter is lost.
        s = wait_for(lambda: (s := stats(url))["healthy"] == 1 and s, 10, "one interpreter marked lost")
        assert [i["lost"] for i in s["interpreters"]].count(True) == 1 and s["pid"] == pid
        assert_healthy_answer(post(url, X))  # the other interpreter serves
        r = post(url, stuck)
        assert r.status_code == 504, r.text
        lost_all = time.monotonic()
        # No interpreter left: check_health fails and Serve starts a new replica from the object store.
        wait_for(lambda: stats(url)["pid"] != pid and post(url, X).status_code == 200, 60,
                 "a new replica serving")
        print(f"\nnative: replica replaced and serving {time.monotonic() - lost_all:.1f} s after its last "
              "interpreter was lost")
        s = stats(url)
        assert s["healthy"] == 2 and s["pid"] != pid
        assert_healthy_answer(post(url, X))


def test_with_every_interpreter_lost_a_request_is_a_503_with_retry_after(serve_session, archives) -> None:
    # Health checks far apart, and no replacement (which would race the requests below, putting an interpreter
    # back in about two seconds): the replica stays, without an interpreter, for the requests below.
    args = {"archive": str(archives["native_sleep"]), "interpreters": 1, "request_timeout_s": TIMEOUT_S,
            "interrupt_grace_s": 0.5, "health_check_period_s": 120.0, "health_check_timeout_s": 60.0,
            "replace_lost_interpreters": False}
    with deployed(serve_session, "lost", args) as url:
        pid = stats(url)["pid"]
        assert post(url, [[models.SLEEP, 8.0, 0, 0]]).status_code == 504  # bounded: the sleep ends by itself
        wait_for(lambda: stats(url)["healthy"] == 0, 10, "the interpreter marked lost")
        for _ in range(2):
            r = post(url, X)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "Unavailable" and "every interpreter" in r.json()["error"]["message"]
            assert int(r.headers["Retry-After"]) >= 1, r.headers
        assert stats(url)["pid"] == pid  # the same replica answered: refused, not restarted


def test_interpreters_stuck_but_not_lost_fail_the_health_check_and_serve_replaces_the_replica(serve_session,
                                                                                             archives) -> None:
    from ray import serve

    # No request timeout: nothing interrupts the calls, so no interpreter is ever marked lost. The stuck replica
    # is killed 2 s after Serve stops it (its calls would never finish).
    args = {"archive": str(archives["native_sleep"]), "interpreters": 2, "request_timeout_s": None,
            "health_check_period_s": 1.0, "health_check_timeout_s": 10.0, "graceful_shutdown_timeout_s": 2.0}
    with deployed(serve_session, "stuck", args) as url, ThreadPoolExecutor(2) as clients:
        pid = stats(url)["pid"]
        assert_healthy_answer(post(url, X))
        (a, token_a), (b, token_b) = sleeping(60.0), sleeping(60.0)
        stuck = [clients.submit(post, url, x, 120) for x in (a, b)]
        wait_started(token_a, token_b)  # one in each interpreter: each holds its own
        # Called as Serve calls it: it fails once its pings queue behind calls that make no progress.
        handle = serve.get_app_handle("stuck")
        with pytest.raises(Exception, match="answered no ping within 5 s and completed no call") as info:
            for _ in range(4):
                handle.check_health.remote().result(timeout_s=30)
        assert "RuntimeError" in str(info.value)
        s = stats(url)
        assert s["pid"] == pid and s["healthy"] == 2 and not any(i["lost"] for i in s["interpreters"])
        assert all(i["queue_depth"] >= 2 for i in s["interpreters"]), s  # a stuck call, a ping queued behind it
        t0 = time.monotonic()
        wait_for(lambda: stats(url)["pid"] != pid, 90, "a new replica in place of the stuck one")
        print(f"\nstuck: replica replaced {time.monotonic() - t0:.1f} s after the failed check")
        assert_healthy_answer(post(url, X))
        s = stats(url)
        assert s["healthy"] == 2 and s["queue_depth"] == 0
        assert all(f.result().status_code >= 500 for f in stuck)  # the stuck calls died with their replica


# -- crashes and shutdown ------------------------------------------------------------------------


def test_a_segfault_takes_the_replica_down_and_serve_restarts_it(serve_session, archives) -> None:
    args = {"archive": str(archives["crash"]), "interpreters": 2, "health_check_period_s": 1.0}
    with deployed(serve_session, "crash", args) as url:
        pid = stats(url)["pid"]
        assert_healthy_answer(post(url, X))
        with ThreadPoolExecutor(2) as clients:
            # In flight on one interpreter while the other crashes the process: both must answer, with a 5xx.
            long, token = sleeping(5.0)
            in_flight = clients.submit(post, url, long, 60)
            wait_started(token)
            t0 = time.monotonic()
            crash = clients.submit(post, url, [[models.CRASH, 0, 0, 0]], 60)
            answers = [crash.result(), in_flight.result()]
        assert all(r.status_code >= 500 for r in answers), [(r.status_code, r.text[:200]) for r in answers]
        assert not pid_alive(pid)
        wait_for(lambda: post(url, X, timeout=30).status_code == 200, 60, "the restarted replica serving")
        recovery = time.monotonic() - t0
        print(f"\ncrash: in-flight answers {[r.status_code for r in answers]}; serving again {recovery:.1f} s "
              "after the segfault")
        # The figure tenfold aims at is < 30 s on this machine when it is not shared; on a 2-core machine under a
        # load of 15-20 from other jobs, a restart (new worker, torch import, 2 interpreters) took up to 34 s.
        assert recovery < 45.0, f"recovery took {recovery:.1f} s"
        assert stats(url)["pid"] != pid
        assert_healthy_answer(post(url, X))


def replica_logs(pid: int) -> list[Path]:
    """The Ray log files of the worker process `pid` (its stdout, stderr and core-worker log)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return sorted(p for p in logs.glob(f"*{pid}*") if p.is_file() and (p.name.endswith((f"-{pid}.out", f"-{pid}.err",
                                                                                           f"_{pid}.log"))))


def replica_pids(url: str, tries: int, want: int) -> set[int] | None:
    """The pids of the replicas that answered `tries` stats requests, if there were exactly `want`."""
    pids = {stats(url)["pid"] for _ in range(tries)}
    return pids if len(pids) == want else None


def assert_clean_exit(pid: int) -> None:
    wait_for(lambda: not pid_alive(pid), 60, f"replica process {pid} to exit")
    files = replica_logs(pid)
    assert any(f.name.endswith(".err") for f in files), f"no stderr log of process {pid}: {files}"
    for f in files:
        text = f.read_text(errors="replace")
        found = [m for m in CRASH_MARKS if m in text]
        assert not found, f"{f} mentions {found}:\n{text[-3000:]}"


def test_scale_down_and_delete_drain_and_exit_without_a_crash(serve_session, archives) -> None:
    from ray import serve

    from tenfold.integration import app_builder

    app = app_builder({
        "archive": str(archives["native_sleep"]), "name": "drain", "interpreters": 1, "num_cpus": 0.5,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 2, "downscale_delay_s": 1.0,
                        "look_back_period_s": 1.0},
    })
    serve.run(app, name="drain", route_prefix="/drain")
    url = f"{serve_session.url}/drain"
    deleted = False
    try:
        pids = wait_for(lambda: replica_pids(url, 12, 2), 30, "both replicas answering")
        # Idle: the autoscaler stops one replica (a scale-down), which must exit cleanly.
        survivor = wait_for(lambda: replica_pids(url, 8, 1) if running_replicas("drain", "drain") == 1 else None,
                            90,
                            "a scale-down to one replica")
        (gone,) = pids - survivor
        assert_clean_exit(gone)
        assert_healthy_answer(post(url, X))
        with ThreadPoolExecutor(2) as clients:  # calls in flight while the application is deleted
            (a, token_a), (b, token_b) = sleeping(1.5), sleeping(1.5)
            in_flight = [clients.submit(post, url, x) for x in (a, b)]
            wait_started(token_a, token_b)
            serve.delete("drain")
            deleted = True
            answers = [f.result() for f in in_flight]
        for r, x in zip(answers, (a, b)):  # drained: answered, not cut off
            assert_healthy_answer(r, x)
    finally:
        if not deleted:
            serve.delete("drain")
    (last,) = survivor
    assert_clean_exit(last)


# -- limits --------------------------------------------------------------------------------------


def test_an_oversized_body_is_a_413_before_it_is_parsed(hang_app: str) -> None:
    url, limit = hang_app, LIMIT
    for media in (codec.JSON_TYPE, codec.ARROW_TYPE):
        # Not JSON and not Arrow: parsing it would be a 400, so a 413 means it was never parsed.
        r = requests.post(url, data=b"\xff" * (limit + 1), headers={"Content-Type": media}, timeout=30)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["type"] == "PayloadTooLarge"
        r = requests.post(url, data=iter([b"\xff" * limit, b"\xff"]), headers={"Content-Type": media},
                          timeout=30)  # chunked: no Content-Length to judge by
        assert r.status_code == 413, r.text
    r = requests.post(url, data=b"\xff" * limit, headers={"Content-Type": codec.JSON_TYPE}, timeout=30)
    assert r.status_code == 400  # at the limit: parsed, and refused as what it is
    assert_healthy_answer(post(url, X))
