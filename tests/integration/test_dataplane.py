"""The data plane on a real local Ray Serve: with `http_port`, every interpreter of a replica serves the
application's routes itself. Both routes answer the same bytes; the errors and limits hold on the port;
keep-alive works and a slow client holds no interpreter; the replica's stats count the port's requests; a
lost interpreter leaves the servers and its replacement joins them; and a rolling redeploy, a downscale and
a killed replica lose no request."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from support import free_port, process_gone, running_replicas, wait_for
from testmodels.serve_models import RAISE, SLEEP, SPIN

from tenfold.integration import codec

pytestmark = pytest.mark.ray

REQUEST_TIMEOUT_S = 1.5
READ_TIMEOUT_S = 1.0
MAX_REQUEST_BYTES = 1 << 20
GOOD = {"inputs": [[[1.0, 2.0, 3.0, 4.0]], [3]]}


def _deploy(name: str, archive: Path, port: int, **extra: object) -> None:
    from ray import serve

    from tenfold.integration import app_builder

    args = {"archive": str(archive), "interpreters": 2, "num_cpus": 0.5, "http_port": port,
            "http_host": "127.0.0.1", **extra}
    serve.run(app_builder(args), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def app(serve_session, probe_archive: Path) -> Iterator[SimpleNamespace]:
    from ray import serve

    port = free_port()
    _deploy("dataplane", probe_archive, port, request_timeout_s=REQUEST_TIMEOUT_S, max_request_bytes=MAX_REQUEST_BYTES,
            http_read_timeout_s=READ_TIMEOUT_S, interrupt_grace_s=0.5)
    yield SimpleNamespace(serve=f"{serve_session.url}/dataplane", port=f"http://127.0.0.1:{port}", port_number=port,
                          handle=serve.get_app_handle("dataplane"))
    serve.delete("dataplane")


def _post(url: str, body: bytes | str, content_type: str = codec.JSON_TYPE) -> requests.Response:
    return requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=30)


def _raw(port: int, data: bytes, *, timeout_s: float = 10.0) -> bytes:
    """What the server answers to `data` sent as is on a fresh connection, until it closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


# -- the same answers on both routes -------------------------------------------------------------


@pytest.mark.parametrize("body", [
    json.dumps(GOOD),
    json.dumps({"inputs": {"x": [[0.5, -1.0, 0.0, 2.0], [1, 1, 1, 1]], "k": [1, 2]}}),
    json.dumps({"inputs": [[[1.0, 2.0, 3.0]], [3]]}),  # 422: the wrong shape
    json.dumps({"inputs": [[[RAISE, 0.0, 0.0, 0.0]], [1]]}),  # 500: the model raises
    "{not json",  # 400
    json.dumps([1, 2]),  # 422: not an object
], ids=["positional", "by-name", "invalid-input", "model-error", "malformed", "not-an-object"])
def test_both_routes_answer_the_same_status_and_bytes(app: SimpleNamespace, body: str) -> None:
    via_serve, via_port = _post(app.serve, body), _post(app.port, body)
    assert via_port.status_code == via_serve.status_code, (via_serve.text, via_port.text)
    assert via_port.content == via_serve.content
    assert via_port.headers["content-type"] == codec.JSON_TYPE


def test_arrow_requests_answer_the_same_on_both_routes(app: SimpleNamespace) -> None:
    body = codec.encode_arrow_inputs([np.ones((3, 4), np.float32), np.arange(3)], ["x", "k"])
    via_serve, via_port = _post(app.serve, body, codec.ARROW_TYPE), _post(app.port, body, codec.ARROW_TYPE)
    assert via_port.status_code == via_serve.status_code == 200
    assert via_port.headers["content-type"] == codec.ARROW_TYPE
    served, ported = codec.decode_arrow_outputs(via_serve.content), codec.decode_arrow_outputs(via_port.content)
    assert served.keys() == ported.keys()
    for name in served:
        np.testing.assert_array_equal(served[name], ported[name])


@pytest.mark.parametrize("path", ["/-/manifest", "/-/openapi.json"])
def test_documents_are_the_same_on_both_routes(app: SimpleNamespace, path: str) -> None:
    via_serve, via_port = requests.get(app.serve + path, timeout=30), requests.get(app.port + path, timeout=30)
    assert via_serve.status_code == via_port.status_code == 200
    assert via_port.json() == via_serve.json()


def test_healthz_answers_on_the_port(app: SimpleNamespace) -> None:
    r = requests.get(app.port + "/-/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


# -- errors and limits on the port ---------------------------------------------------------------


def test_other_paths_and_methods_are_404_and_405(app: SimpleNamespace) -> None:
    missing = requests.get(app.port + "/nope", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFound"
    wrong = requests.get(app.port + "/", timeout=30)
    assert wrong.status_code == 405 and wrong.headers["Allow"] == "POST"
    assert requests.post(app.port + "/-/stats", timeout=30).status_code == 405


def test_an_unsupported_content_type_is_415(app: SimpleNamespace) -> None:
    r = _post(app.port, "x", "text/plain")
    assert r.status_code == 415 and "text/plain" in r.json()["error"]["message"]


def test_a_body_over_the_limit_is_413_before_it_is_sent(app: SimpleNamespace) -> None:
    # Only the headers are sent: the answer must come without waiting for the body.
    t0 = time.monotonic()
    head_only = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {MAX_REQUEST_BYTES + 1}\r\n\r\n").encode()
    answer = _raw(app.port_number, head_only, timeout_s=READ_TIMEOUT_S / 2)
    assert time.monotonic() - t0 < READ_TIMEOUT_S / 2
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert json.loads(body)["error"]["type"] == "PayloadTooLarge"


def test_a_chunked_body_over_the_limit_is_413(app: SimpleNamespace) -> None:
    chunks = (b"x" * 65536 for _ in range(MAX_REQUEST_BYTES // 65536 + 2))
    r = requests.post(app.port, data=chunks, headers={"Content-Type": codec.JSON_TYPE}, timeout=30)
    assert r.status_code == 413


def test_a_call_past_the_deadline_is_504_and_interrupted_in_its_interpreter(app: SimpleNamespace) -> None:
    t0 = time.monotonic()
    r = _post(app.port, json.dumps({"inputs": [[[SPIN, 60_000.0, 0.0, 0.0]], [1]]}))  # a minute of pure Python
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "Timeout"
    assert took < REQUEST_TIMEOUT_S + 1.0, f"answered after {took:.2f} s"
    # The interrupted interpreter serves again: every interpreter answers at once.
    for _ in range(10):
        assert _post(app.port, json.dumps(GOOD)).status_code == 200


# -- connections ------------------------------------------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(app: SimpleNamespace) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", app.port_number, timeout=30)
    conn.connect()
    sock = conn.sock
    for _ in range(50):
        conn.request("POST", "/", body=json.dumps(GOOD), headers={"Content-Type": codec.JSON_TYPE})
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        assert conn.sock is sock, "the server closed a keep-alive connection"
    conn.close()


def test_a_slow_client_times_out_without_holding_an_interpreter(app: SimpleNamespace) -> None:
    # More half-sent requests than there are interpreters: if any held one, the calls below would wait.
    slow = [socket.create_connection(("127.0.0.1", app.port_number), timeout=10) for _ in range(4)]
    for s in slow:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"inp")
    t0 = time.monotonic()
    for _ in range(20):
        assert _post(app.port, json.dumps(GOOD)).status_code == 200
    assert time.monotonic() - t0 < READ_TIMEOUT_S, "the slow clients held the interpreters"
    for s in slow:
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        s.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"RequestTimeout" in answer


def test_requests_spread_over_the_interpreters(app: SimpleNamespace) -> None:
    # Two connections, each busy with calls that hold the interpreter for 50 ms: one interpreter alone would
    # take twice as long as two interpreters serving one connection each. A connection that an earlier test's
    # client left open counts as load for a second after its last request: wait that out first.
    wait_for(lambda: not any(app.handle.stats.remote().result()["http_port"]["connections_active"]), 10,
             "no connection active")
    before = app.handle.stats.remote().result()["interpreters"]
    body = json.dumps({"inputs": [[[SPIN, 50.0, 0.0, 0.0]], [1]]})

    def client() -> None:
        with requests.Session() as s:
            for _ in range(10):
                assert s.post(app.port, data=body, headers={"Content-Type": codec.JSON_TYPE}, timeout=30).ok

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def served() -> list[int] | None:
        after = app.handle.stats.remote().result()["interpreters"]
        counts = [a["calls"] - b["calls"] for a, b in zip(after, before)]
        return counts if sum(counts) >= 20 else None

    # The host folds the servers' counters into the replica's figures a few times a second.
    counts = wait_for(served, 5, "the 20 calls to be counted", interval_s=0.1)
    assert min(counts) >= 5, counts


# -- what the replica sees -------------------------------------------------------------------------


def test_stats_count_the_ports_requests_and_errors(app: SimpleNamespace) -> None:
    before = app.handle.stats.remote().result()
    for _ in range(7):
        assert _post(app.port, json.dumps(GOOD)).status_code == 200
    assert _post(app.port, "{bad").status_code == 400
    after = app.handle.stats.remote().result()
    assert after["calls"] - before["calls"] >= 8
    assert after["errors"] - before["errors"] >= 1
    # The port serves the replica's figures too, refreshed by the host every half second.
    served = wait_for(lambda: (s := requests.get(app.port + "/-/stats", timeout=30).json())["calls"] >= after["calls"]
                      and s, 10, "the port's /-/stats to catch up")
    assert served["size"] == 2 and served["pid"] == after["pid"]
    # Its connections, per interpreter: the requests above were each on a connection of its own, now closed.
    port = after["http_port"]
    assert port["port"] == app.port_number and len(port["connections_open"]) == len(port["connections_active"]) == 2


def test_port_requests_count_as_busy_time_for_autoscaling(app: SimpleNamespace) -> None:
    from tenfold.integration import policy

    body = json.dumps({"inputs": [[[SPIN, 200.0, 0.0, 0.0]], [1]]})
    stop = threading.Event()

    def client() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                s.post(app.port, data=body, headers={"Content-Type": codec.JSON_TYPE}, timeout=30)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        # Two clients keep the interpreters busy: the utilization autoscaling reads climbs over its window (it
        # stayed at 0 before the port's busy time was counted, as only the port has calls here). How evenly the
        # clients spread over the interpreters is test_requests_spread_over_the_interpreters' to check.
        figures = wait_for(lambda: (f := app.handle.record_autoscaling_stats.remote().result())[policy.UTILIZATION]
                           > 0.4 and f, 30, "the port's busy time to reach the utilization autoscaling reads")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert figures[policy.INTERPRETERS] == 2.0


def test_a_lost_interpreter_leaves_the_servers_and_its_replacement_joins(app: SimpleNamespace) -> None:
    before = app.handle.stats.remote().result()
    # time.sleep cannot be interrupted: past request_timeout_s + interrupt_grace_s the host takes the
    # interpreter out of service and starts another in its place.
    stuck = threading.Thread(target=_post, args=(app.port, json.dumps({"inputs": [[[SLEEP, 8.0, 0.0, 0.0]], [1]]})))
    stuck.start()
    stats = wait_for(lambda: (s := app.handle.stats.remote().result())["replaced"] > before["replaced"] and s, 30,
                     "the stuck interpreter to be replaced")
    assert stats["healthy"] == 2
    # Every request now reaches a serving interpreter at once, none the stuck one.
    t0 = time.monotonic()
    for _ in range(20):
        assert _post(app.port, json.dumps(GOOD)).status_code == 200
    assert time.monotonic() - t0 < 5.0
    stuck.join(30)


# -- the port beside Serve's own route --------------------------------------------------------------


def test_a_second_application_is_refused_the_port_by_name(serve_session, app: SimpleNamespace) -> None:
    from tenfold.integration.listener import PortInUse, listen

    with pytest.raises(PortInUse, match="'dataplane'"):
        listen("127.0.0.1", app.port_number, "someone-else")


def test_connections_past_the_replicas_share_are_answered_503_with_retry_after(serve_session,
                                                                             probe_archive: Path) -> None:
    from ray import serve

    port = free_port()
    # 1 request at once and 1 queued: each interpreter takes 1 connection; the rest are told to come back.
    _deploy("dp-busy", probe_archive, port, max_ongoing_requests=1, max_queued_requests=1, retry_after_s=2.0)
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(4)]
    try:
        for c in conns:
            c.connect()
        handle = serve.get_app_handle("dp-busy")
        wait_for(lambda: sum(handle.stats.remote().result()["http_port"]["connections_open"]) == 4, 10,
                 "every connection accepted", interval_s=0.05)
        answers = []
        for c in conns:
            c.request("POST", "/", body=json.dumps(GOOD), headers={"Content-Type": codec.JSON_TYPE})
            r = c.getresponse()
            answers.append((r.status, r.getheader("Retry-After"), json.loads(r.read())))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200, 200, 503, 503], answers
        for status, retry_after, body in answers:
            if status == 503:
                assert retry_after == "2" and body["error"]["type"] == "Overloaded"
    finally:
        for c in conns:
            c.close()
        serve.delete("dp-busy")


# -- lifecycle under load -----------------------------------------------------------------------------


class _Load:
    """Clients posting over keep-alive connections until stopped; every answer and failure is kept."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url, self.statuses, self.failures = url, Counter[int](), []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with requests.Session() as s:
            while not self._stop.is_set():
                try:
                    r = s.post(self.url, data=json.dumps(GOOD), headers={"Content-Type": codec.JSON_TYPE}, timeout=30)
                    self.statuses[r.status_code] += 1
                except requests.RequestException as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.002)

    def stop(self) -> Counter[int]:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        return self.statuses


def test_redeploy_downscale_and_a_killed_replica_lose_no_request(serve_session, probe_archive: Path) -> None:
    from ray import serve

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    _deploy("dp-life", probe_archive, port, num_replicas=2)
    try:
        load = _Load(url)
        wait_for(lambda: sum(load.statuses.values()) > 50, 30, "the load to start")
        # A rolling redeploy (a new argument makes new replicas), then a downscale from 2 replicas to 1.
        _deploy("dp-life", probe_archive, port, num_replicas=2, request_timeout_s=20.0)
        _deploy("dp-life", probe_archive, port, num_replicas=1, request_timeout_s=20.0)
        wait_for(lambda: running_replicas("dp-life", "probe") == 1, 60, "the downscale")
        served = sum(load.statuses.values())
        wait_for(lambda: sum(load.statuses.values()) > served + 50, 30, "requests to the one replica left")
        statuses = load.stop()
        assert load.failures == [], load.failures[:5]
        assert set(statuses) == {200}, statuses
        assert statuses[200] > 200

        # A replica killed by a signal leaves the port to its sibling.
        _deploy("dp-life", probe_archive, port, num_replicas=2, request_timeout_s=20.0)
        pids = {requests.get(url + "/-/stats", timeout=30).json()["pid"] for _ in range(40)}
        handle = serve.get_app_handle("dp-life")
        pids |= {handle.stats.remote().result()["pid"] for _ in range(20)}
        assert len(pids) == 2, pids
        killed = pids.pop()
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: process_gone(killed), 10, "the killed replica gone", interval_s=0.02)
        t0 = time.monotonic()
        answers = Counter(_post(url, json.dumps(GOOD)).status_code for _ in range(50))
        assert answers == {200: 50} and time.monotonic() - t0 < 10
    finally:
        serve.delete("dp-life")
