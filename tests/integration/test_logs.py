"""What a replica writes to its logs, on a real local Ray Serve: one line for a caller's mistake, a traceback for
the model's, and nothing but Serve's access line for a request its caller gave up on."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from support import wait_for
from testmodels.serve_models import RAISE, SLEEP

from tenfold.integration import codec, logs

#: What asyncio and concurrent.futures write for an outcome nobody read or could not be set, and what a
#: cancellation caught as an error writes.
NOISE = ("never retrieved", "exception calling callback", "InvalidStateError", "CancelledError")
_RECORD = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-\d\d-\d\d ")


@pytest.fixture(scope="module")
def apps(serve_session, probe_archive: Path) -> Iterator[dict[str, SimpleNamespace]]:
    """Two applications of one interpreter each (a call can be held queued behind a slow one): `bounded` with
    the default request_timeout_s, `unbounded` without one (a call awaited another way)."""
    from ray import serve

    from tenfold.integration import app_builder

    deployed = {}
    try:
        for name, timeout in (("bounded", {}), ("unbounded", {"request_timeout_s": None})):
            app = app_builder({"archive": str(probe_archive), "name": name, "interpreters": 1, "num_cpus": 0.25,
                               **timeout})
            handle = serve.run(app, name=f"logs_{name}", route_prefix=f"/logs_{name}")
            pid = handle.manifest.remote().result(timeout_s=30)["pid"]
            deployed[name] = SimpleNamespace(handle=handle, app=f"logs_{name}", pid=pid,
                                             url=f"{serve_session.url}/logs_{name}")
        yield deployed
    finally:
        for app in deployed.values():
            serve.delete(app.app)


def replica_log(app: str) -> str:
    """The text of the Serve log files of `app`'s replicas (what Serve's logger writes, access lines included)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"replica_{app}_*.log")))


def logged(app: str, words: str) -> str | None:
    """`app`'s replica log once it holds `words`, else None."""
    text = replica_log(app)
    return text if words in text else None


def worker_output(pid: int) -> str:
    """The replica process's stdout and stderr, where asyncio's and concurrent.futures' loggers write."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob(f"worker-*-{pid}.*"))
                   if p.name.endswith((".out", ".err")))


def records(text: str) -> list[list[str]]:
    """The log records of `text`, each its lines (a traceback's lines follow the line they belong to)."""
    found: list[list[str]] = []
    for line in text.splitlines():
        if _RECORD.match(line) or not found:
            found.append([line])
        else:
            found[-1].append(line)
    return found


def records_with(text: str, words: str) -> list[list[str]]:
    return [r for r in records(text) if any(words in line for line in r)]


@pytest.mark.ray
def test_a_bad_handle_call_logs_one_line_and_a_model_error_its_traceback(apps: dict[str, SimpleNamespace]) -> None:
    app = apps["bounded"]
    with pytest.raises(codec.InvalidInput, match=r"has size 7 in dim 1"):
        app.handle.remote(torch.zeros(1, 7), torch.zeros(1, dtype=torch.int64)).result(timeout_s=30)
    with pytest.raises(ValueError, match="input 'x' is given twice"):  # refused before the interpreters
        app.handle.remote(torch.zeros(1, 4), x=torch.zeros(1, 4)).result(timeout_s=30)
    with pytest.raises(ValueError, match="probe refuses") as raised:
        app.handle.remote(torch.tensor([[RAISE, 0, 0, 0]]), torch.tensor([1])).result(timeout_s=30)
    assert not isinstance(raised.value, codec.InvalidInput)
    # Serve's route answers a bad request with its status, and the replica writes only Serve's access line.
    r = requests.post(app.url, json={"inputs": [[[1, 2, 3]], [1]]}, timeout=30)
    assert r.status_code == 422, r.text

    text = wait_for(lambda: logged(app.app, " 422 "), 30, "the replica's access line of the 422")
    for words in ("has size 7 in dim 1", "is given twice"):
        found = records_with(text, words)
        assert len(found) == 1 and len(found[0]) == 1, f"{words!r} in {len(found)} records:\n{text}"
        line = found[0][0]
        assert line.startswith("WARNING ") and "422 InvalidInput" in line and "Traceback" not in line, line
    model = records_with(text, "probe refuses")
    assert len(model) == 1 and model[0][0].startswith("ERROR ") and any("Traceback" in x for x in model[0]), text
    assert not records_with(text, "has size 3 in dim 1"), text


@pytest.mark.ray
@pytest.mark.parametrize("name", ["bounded", "unbounded"])
def test_a_cancelled_call_and_a_client_gone_mid_request_leave_no_noise(apps: dict[str, SimpleNamespace],
                                                                       name: str) -> None:
    app = apps[name]

    def stats() -> dict:
        return app.handle.stats.remote().result(timeout_s=30)

    def holding(depth: int) -> bool:
        """`depth` calls in the interpreter, and none of them ended within 0.3 s: not a health check's ping,
        which comes and goes in a few milliseconds."""
        before = stats()
        if before["queue_depth"] < depth:
            return False
        time.sleep(0.3)
        after = stats()
        return after["queue_depth"] >= depth and after["calls"] == before["calls"]

    calls = stats()["calls"]
    slow = app.handle.remote(torch.tensor([[SLEEP, 3.0, 0, 0]]), torch.tensor([1]))
    # In the interpreter before the next is sent: two handle calls may reach the replica in either order.
    wait_for(lambda: holding(1), 30, "the slow call to reach the interpreter", interval_s=0.05)
    doomed = app.handle.remote(torch.tensor([[RAISE, 0, 0, 0]]), torch.tensor([1]))  # queued behind it
    wait_for(lambda: holding(2), 30, "both calls to reach the interpreter", interval_s=0.05)
    doomed.cancel()  # its call still fails in the interpreter, after its caller has gone
    slow.cancel()
    with pytest.raises(requests.exceptions.ReadTimeout):  # the client hangs up while its call waits
        requests.post(app.url, json={"inputs": [[[SLEEP, 1.0, 0, 0]], [1]]}, timeout=0.5)
    wait_for(lambda: (s := stats())["calls"] >= calls + 3 and s["queue_depth"] == 0, 30, "the three calls to end")
    # One more call: the replica's event loop settles the three before it answers.
    app.handle.remote(torch.zeros(1, 4), torch.tensor([1])).result(timeout_s=30)

    text = replica_log(app.app)
    assert len(re.findall(r"(CALL __call__|POST /\S+) CANCELLED", text)) == 3, text  # the cancels reached it
    logs = text + worker_output(app.pid)
    found = [n for n in NOISE if n in logs]
    assert not found, logs[-6000:]


def _record_of(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None, sys.exc_info())


def test_the_filter_writes_only_the_callers_errors_in_one_line() -> None:
    keep = logs._ClientErrorsInOneLine()
    record = _record_of(codec.InvalidInput("input 'x' is missing\nsee /-/manifest"))
    assert keep.filter(record)
    assert record.exc_info is None and record.levelname == "WARNING"
    assert record.getMessage() == "Request failed: 422 InvalidInput: input 'x' is missing\\nsee /-/manifest"
    # The replica's own errors (a 503) and the model's keep their traceback, and so does an HTTPError that
    # did not come through HTTPError.__init__ (a RayTaskError wrapping one is an instance of its class).
    wrapped = codec.InvalidInput.__new__(codec.InvalidInput)
    Exception.__init__(wrapped, "Traceback ...\n")
    for exc in (codec.HTTPError("busy", status=503), ValueError("probe refuses"), wrapped):
        record = _record_of(exc)
        assert keep.filter(record)
        assert record.exc_info is not None and record.levelname == "ERROR" and record.getMessage() == "Request failed."
