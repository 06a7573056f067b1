"""tenfold.integration on a real local Ray Serve: HTTP (JSON, Arrow), handles, errors, deploy-time checks,
batching, autoscaling and metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from support import free_port, running_replicas, wait_for
from testmodels import serve_models
from testmodels.serve_models import RAISE, SPIN

from tenfold.integration import codec

pytestmark = pytest.mark.ray

REQUEST_TIMEOUT_S = 1.5
MAX_REQUEST_BYTES = 1 << 20  # well past the runtime's 64 KiB inline window: large bodies reach the interpreters


def expected(x: list, k: list) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        y, k2 = serve_models.Probe()(torch.tensor(x, dtype=torch.float32), torch.tensor(k))
    return y.numpy(), k2.numpy()


@pytest.fixture(scope="module")
def probe(serve_session, probe_archive: Path) -> Iterator[SimpleNamespace]:
    from ray import serve

    from tenfold.integration import app_builder

    app = app_builder({
        "archive": str(probe_archive),
        "interpreters": 2,
        "num_cpus": 0.5,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "max_request_bytes": MAX_REQUEST_BYTES,
    })
    handle = serve.run(app, name="probe", route_prefix="/probe")
    yield SimpleNamespace(handle=handle, url=f"{serve_session.url}/probe")
    serve.delete("probe")


# -- calls that succeed ----------------------------------------------------------------------------


def test_json_call_answers_the_models_outputs(probe: SimpleNamespace) -> None:
    x, k = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], [3, 4]
    r = requests.post(probe.url, json={"inputs": [x, k]}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(codec.JSON_TYPE)
    y, k2 = r.json()["outputs"]
    want_y, want_k = expected(x, k)
    np.testing.assert_allclose(np.array(y, dtype=np.float32), want_y, rtol=1e-6)
    assert k2 == want_k.tolist() == [6, 8]
    # Inputs by name are the same call.
    r = requests.post(probe.url, json={"inputs": {"k": k, "x": x}}, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][1] == [6, 8]


def test_arrow_call_answers_arrow(probe: SimpleNamespace) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    k = np.array([1, 2, 3])
    body = codec.encode_arrow_inputs([x, k], ["x", "k"])
    r = requests.post(probe.url, data=body, headers={"Content-Type": codec.ARROW_TYPE}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == codec.ARROW_TYPE
    out = codec.decode_arrow_outputs(r.content)
    want_y, want_k = expected(x.tolist(), k.tolist())
    assert list(out) == ["output_0", "output_1"]
    np.testing.assert_allclose(out["output_0"], want_y, rtol=1e-6)
    assert out["output_1"].tolist() == want_k.tolist()


def test_json_bodies_and_answers_larger_than_the_inline_window_are_served(probe: SimpleNamespace) -> None:
    from tenfold.runtime._wire import WINDOW_BYTES

    rng = np.random.default_rng(3)
    x, k = rng.standard_normal((4000, 4)).astype(np.float32).tolist(), list(range(4000))
    body = codec.json.dumps({"inputs": [x, k]}).encode()
    assert len(body) > 2 * WINDOW_BYTES
    r = requests.post(probe.url, data=body, headers={"Content-Type": codec.JSON_TYPE}, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert len(r.content) > 2 * WINDOW_BYTES
    y, k2 = r.json()["outputs"]
    want_y, want_k = expected(x, k)
    np.testing.assert_allclose(np.array(y, dtype=np.float32), want_y, rtol=1e-5, atol=1e-6)
    assert k2 == want_k.tolist()


def test_manifest_and_stats_endpoints(probe: SimpleNamespace, probe_archive: Path) -> None:
    from tenfold.packaging import archive_sha256

    r = requests.get(f"{probe.url}/-/manifest", timeout=30)
    assert r.status_code == 200
    doc = r.json()
    assert doc["manifest"]["name"] == "probe"
    assert [i["name"] for i in doc["manifest"]["inputs"]] == ["x", "k"]
    assert doc["sha256"] == archive_sha256(probe_archive)
    assert doc["interpreters"] == 2 and doc["backend"] == "namespaces"
    stats = requests.get(f"{probe.url}/-/stats", timeout=30).json()
    assert stats["size"] == 2 and stats["healthy"] == 2


def test_handle_calls_take_tensors_and_arrays(probe: SimpleNamespace) -> None:
    x = [[1.0, 0.0, 0.0, 0.0]]
    want_y, _ = expected(x, [5])
    y, k2 = probe.handle.remote(torch.tensor(x), torch.tensor([5])).result(timeout_s=30)
    assert isinstance(y, torch.Tensor)
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-6)
    assert k2.tolist() == [10]
    y, k2 = probe.handle.remote(np.array(x, dtype=np.float32), np.array([5])).result(timeout_s=30)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-6)
    assert probe.handle.check_health.remote().result(timeout_s=30) is None


def test_handle_calls_from_another_deployment(serve_session, probe_archive: Path) -> None:
    from ray import serve
    from testmodels.serve_callers import Caller

    from tenfold.integration import app_builder

    model = app_builder({"archive": str(probe_archive), "interpreters": 1, "num_cpus": 0.25, "name": "inner"})
    handle = serve.run(Caller.bind(model), name="composed", route_prefix="/composed")
    try:
        x, k = [[0.0, 1.0, 2.0, 3.0]], [7]
        y, k2 = handle.remote(x, k).result(timeout_s=60)
        np.testing.assert_allclose(np.array(y, dtype=np.float32), expected(x, k)[0], rtol=1e-6)
        assert k2 == [14]
    finally:
        serve.delete("composed")


def test_concurrent_requests_run_in_both_interpreters(probe: SimpleNamespace) -> None:
    before = requests.get(f"{probe.url}/-/stats", timeout=30).json()["interpreters"]
    body = {"inputs": [[[SPIN, 30.0, 0.0, 0.0]], [1]]}
    with ThreadPoolExecutor(4) as clients:  # bounded: 4 requests outstanding at most
        codes = list(clients.map(lambda _: requests.post(probe.url, json=body, timeout=30).status_code, range(16)))
    assert codes == [200] * 16
    after = requests.get(f"{probe.url}/-/stats", timeout=30).json()["interpreters"]
    served = [a["calls"] - b["calls"] for a, b in zip(after, before)]
    assert sum(served) >= 16 and all(n > 0 for n in served), served


# -- every error status ----------------------------------------------------------------------------

ERRORS = [
    # (method, path, content type, body, status, words in the message)
    ("POST", "", codec.JSON_TYPE, b"{not json", 400, "not valid JSON"),
    ("POST", "", codec.ARROW_TYPE, b"not an arrow stream", 400, "not an Arrow IPC stream"),
    ("POST", "", codec.JSON_TYPE, b'{"inputs": [[[1, 2, 3, 4]]]}', 422, "takes 2 input(s)"),
    ("POST", "", codec.JSON_TYPE, b'{"input": []}', 422, 'exactly the key "inputs"'),
    ("POST", "", codec.JSON_TYPE, b'{"inputs": [[[1, 2, 3]], [1]]}', 422, "input 0 (x) has shape [1, 3]"),
    ("POST", "", codec.JSON_TYPE, b'{"inputs": [[[1, 2, 3, 4]], [0.5]]}', 422, "input 1 (k) must be int64"),
    ("POST", "", codec.ARROW_TYPE, codec.encode_arrow([np.zeros((1, 4)), np.zeros(1, np.int64)], ["x", "k"]), 422,
     "does not convert safely to float32"),
    ("POST", "", "text/csv", b"1,2,3", 415, "Content-Type 'text/csv' is not served"),
    ("GET", "", None, None, 405, "POST inputs to /"),
    ("POST", "/-/manifest", None, b"", 405, "GET /-/manifest"),
    ("GET", "/nowhere", None, None, 404, "no route /nowhere"),
]


@pytest.mark.parametrize(("method", "path", "media", "body", "status", "words"), ERRORS,
                         ids=[f"{e[4]}-{e[5][:24]}" for e in ERRORS])
def test_bad_requests_get_a_4xx_with_a_json_error(probe: SimpleNamespace, method: str, path: str,
                                                   media: str | None, body: bytes | None, status: int,
                                                   words: str) -> None:
    headers = {"Content-Type": media} if media else {}
    r = requests.request(method, probe.url + path, data=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["status"] == status and words in error["message"], error


def test_model_exception_is_a_500_with_its_type_and_message_and_serving_goes_on(probe: SimpleNamespace) -> None:
    for _ in range(3):  # more calls than interpreters: each one fails once at least
        r = requests.post(probe.url, json={"inputs": [[[RAISE, 0, 0, 0]], [1]]}, timeout=30)
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "ModelError" and error["message"] == "ValueError: probe refuses -1000"
    for _ in range(4):
        r = requests.post(probe.url, json={"inputs": [[[1, 2, 3, 4]], [1]]}, timeout=30)
        assert r.status_code == 200 and r.json()["outputs"][1] == [2]


def test_handle_errors_name_the_problem(probe: SimpleNamespace) -> None:
    # Inputs that do not fit raise ValueError naming them; the model's own exception keeps its type.
    with pytest.raises(ValueError, match=r"input 0 \('x'\) has size 5 in dim 1") as bad:
        probe.handle.remote(torch.zeros(1, 5), torch.zeros(1, dtype=torch.int64)).result(timeout_s=30)
    assert isinstance(bad.value, codec.InvalidInput)
    with pytest.raises(ValueError, match="probe refuses") as raised:
        probe.handle.remote(torch.tensor([[RAISE, 0, 0, 0]]), torch.tensor([1])).result(timeout_s=30)
    assert not isinstance(raised.value, codec.InvalidInput)


def test_handle_calls_take_inputs_by_name_as_http_does(probe: SimpleNamespace) -> None:
    x, k = [[1.0, 2.0, 3.0, 4.0]], [3]
    by_name = probe.handle.remote(k=torch.tensor(k), x=torch.tensor(x)).result(timeout_s=30)
    by_position = probe.handle.remote(torch.tensor(x), torch.tensor(k)).result(timeout_s=30)
    assert all(torch.equal(a, b) for a, b in zip(by_name, by_position))
    mixed = probe.handle.remote(torch.tensor(x), k=torch.tensor(k)).result(timeout_s=30)
    assert all(torch.equal(a, b) for a, b in zip(mixed, by_position))
    with pytest.raises(ValueError, match=r"inputs by name must be exactly \['x', 'k'\]; .*unexpected \['q'\]"):
        probe.handle.remote(torch.tensor(x), q=1).result(timeout_s=30)
    with pytest.raises(ValueError, match="input 'x' is given twice"):
        probe.handle.remote(torch.tensor(x), x=torch.tensor(x)).result(timeout_s=30)


# -- deploy-time checks ----------------------------------------------------------------------------


def test_deploy_refuses_a_wrong_pin_a_missing_file_and_an_unpinned_archive(probe_archive: Path) -> None:
    from pydantic import ValidationError

    from tenfold.integration import DeployError, app_builder
    from tenfold.packaging import archive_sha256

    actual = archive_sha256(probe_archive)
    with pytest.raises(DeployError) as info:
        app_builder({"archive": str(probe_archive), "sha256": "0" * 64})
    assert str(probe_archive) in str(info.value) and actual in str(info.value) and "0" * 64 in str(info.value)
    with pytest.raises(DeployError, match="missing.pt: no such file; package a model"):
        app_builder({"archive": str(probe_archive.with_name("missing.pt"))})
    with pytest.raises(ValidationError, match="require_sha256 is set but no sha256 is pinned") as info:
        app_builder({"archive": str(probe_archive), "require_sha256": True})
    assert str(probe_archive) in str(info.value)
    # Pinned and required: a wrong pin is still refused, naming both digests.
    with pytest.raises(DeployError) as info:
        app_builder({"archive": str(probe_archive), "sha256": "ab" * 32, "require_sha256": True})
    assert actual in str(info.value) and "ab" * 32 in str(info.value)


def test_deploy_refuses_a_replica_larger_than_every_node_before_anything_deploys(serve_session,
                                                                                 probe_archive: Path) -> None:
    from tenfold.integration import DeployError, app_builder

    # The session's Ray has one node of 4 CPUs: 6 interpreters (a CPU each) fit no node, 4 do.
    with pytest.raises(DeployError, match=r"needs 6 CPUs .* the largest node of this cluster has 4\b"):
        app_builder({"archive": str(probe_archive), "interpreters": 6})
    with pytest.raises(DeployError, match=r"needs 4.5 CPUs"):
        app_builder({"archive": str(probe_archive), "interpreters": 2, "num_cpus": 4.5})
    app_builder({"archive": str(probe_archive), "interpreters": 4})


def test_batching_needs_a_batch_dimension(tmp_path: Path) -> None:
    from tenfold.integration import DeployError, app_builder
    from tenfold.packaging import save

    fixed = tmp_path / "fixed.pt"
    save(serve_models.probe, fixed, example_inputs=serve_models.example_inputs(), dynamic={"x": [], "k": []})
    with pytest.raises(DeployError, match=r"max_batch_size needs a dynamic first .* x: float32\[2, 4\]"):
        app_builder({"archive": str(fixed), "max_batch_size": 4})


# -- batching --------------------------------------------------------------------------------------

BATCH = 8


@pytest.fixture(scope="module")
def batched(serve_session, probe_archive: Path) -> Iterator[SimpleNamespace]:
    """The probe with dynamic batching: one interpreter, batches of up to 8 requests gathered for 0.2 s, on Serve's
    route and on http_port."""
    from ray import serve

    from tenfold.integration import app_builder

    port = free_port()
    app = app_builder({"archive": str(probe_archive), "interpreters": 1, "num_cpus": 0.25, "max_batch_size": BATCH,
                       "batch_wait_timeout_s": 0.2, "request_timeout_s": REQUEST_TIMEOUT_S, "name": "probe",
                       "http_port": port, "http_host": "127.0.0.1"})
    handle = serve.run(app, name="batched", route_prefix="/batched")
    url = f"{serve_session.url}/batched"

    def calls(route: str) -> int:
        """Model calls so far: every call (those of http_port's requests too), or http_port's."""
        stats = requests.get(f"{url}/-/stats", timeout=30).json()
        return stats["calls"] if route == "serve" else stats["http_port"]["model_calls"]

    yield SimpleNamespace(handle=handle, urls={"serve": url, "http_port": f"http://127.0.0.1:{port}"},
                          stats=lambda: requests.get(f"{url}/-/stats", timeout=30).json(), calls=calls)
    serve.delete("batched")


def batch_inputs(n: int = BATCH) -> list[tuple[list, list]]:
    """`n` requests of different sizes and values (1 or 2 rows each)."""
    return [([[float(i), 1.0, 2.0, 3.0], [0.0, float(i), 0.0, 0.0]][: 1 + i % 2], [i, -i][: 1 + i % 2])
            for i in range(n)]


def all_at_once(call, items: list) -> list:  # noqa: ANN001
    barrier = threading.Barrier(len(items))

    def one(item):  # noqa: ANN001, ANN202
        barrier.wait()
        return call(item)

    with ThreadPoolExecutor(len(items)) as clients:
        return list(clients.map(one, items))


@pytest.mark.parametrize("route", ["serve", "http_port"])
def test_batching_joins_json_requests_and_splits_the_answers(batched: SimpleNamespace, route: str) -> None:
    url = batched.urls[route]
    calls = batched.calls(route)
    items = batch_inputs()
    answers = all_at_once(lambda item: requests.post(url, json={"inputs": list(item)}, timeout=30), items)
    for (x, k), r in zip(items, answers):
        assert r.status_code == 200, r.text
        y, k2 = r.json()["outputs"]
        np.testing.assert_allclose(np.array(y, dtype=np.float32), expected(x, k)[0], rtol=1e-6)
        assert k2 == [2 * v for v in k]
    assert batched.calls(route) - calls < len(items)  # fewer model calls than requests: they were joined
    r = requests.post(url, json={"inputs": [[[1, 2, 3, 4]], [1, 2]]}, timeout=30)
    assert r.status_code == 422 and "same first (batch) dimension" in r.json()["error"]["message"]
    r = requests.post(url, json={"inputs": [[[1, 2, 3]], [1]]}, timeout=30)
    assert r.status_code == 422 and "input 0 (x) has shape [1, 3]" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("route", ["serve", "http_port"])
def test_batching_joins_arrow_requests_and_answers_each_in_arrow(batched: SimpleNamespace, route: str) -> None:
    calls = batched.calls(route)
    items = batch_inputs()

    def call(item: tuple) -> requests.Response:
        body = codec.encode_arrow_inputs([np.array(item[0], np.float32), np.array(item[1])], ["x", "k"])
        return requests.post(batched.urls[route], data=body, headers={"Content-Type": codec.ARROW_TYPE},
                             timeout=30)

    answers = all_at_once(call, items)
    for (x, k), r in zip(items, answers):
        assert r.status_code == 200 and r.headers["content-type"] == codec.ARROW_TYPE, r.text
        out = codec.decode_arrow_outputs(r.content)
        np.testing.assert_allclose(out["output_0"], expected(x, k)[0], rtol=1e-6)
        assert out["output_1"].tolist() == [2 * v for v in k]
    assert batched.calls(route) - calls < len(items)


def test_batching_joins_handle_calls_and_answers_each_its_own_rows(batched: SimpleNamespace) -> None:
    calls = batched.stats()["calls"]
    items = batch_inputs()
    answers = all_at_once(
        lambda item: batched.handle.remote(torch.tensor(item[0]), torch.tensor(item[1])).result(timeout_s=30), items)
    for (x, k), (y, k2) in zip(items, answers):
        assert isinstance(y, torch.Tensor) and y.shape == (len(x), 3)
        np.testing.assert_allclose(y.numpy(), expected(x, k)[0], rtol=1e-6)
        assert k2.tolist() == [2 * v for v in k]
    assert batched.stats()["calls"] - calls < len(items)


def test_a_batched_call_past_request_timeout_is_a_504_and_its_batch_runs_to_the_end(batched: SimpleNamespace) -> None:
    before = batched.stats()
    slow = [[serve_models.SLEEP, 2 * REQUEST_TIMEOUT_S, 0.0, 0.0]]
    r = requests.post(batched.urls["serve"], json={"inputs": [slow, [1]]}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "Timeout", r.text
    # A batch is shared by the requests in it: one caller's deadline does not interrupt it. It ends by itself,
    # as a call that succeeded, and the interpreter serves again.
    # Health pings count as calls too: finished is nothing queued or running, and at least one more call.
    after = wait_for(lambda: (s := batched.stats())["calls"] > before["calls"] and s["queue_depth"] == 0 and s, 30,
                     "the slow batch to finish")
    assert after["errors"] == before["errors"] and after["healthy"] == 1
    r = requests.post(batched.urls["serve"], json={"inputs": [[[1, 2, 3, 4]], [1]]}, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][1] == [2]


def test_a_batched_call_on_http_port_past_request_timeout_is_a_504_and_the_interpreter_serves_on(
        batched: SimpleNamespace) -> None:
    # There the batch runs on the server's own thread, which its watchdog interrupts: every request in it is a 504.
    slow = [[SPIN, 4000 * REQUEST_TIMEOUT_S, 0.0, 0.0]]
    t0 = time.monotonic()
    r = requests.post(batched.urls["http_port"], json={"inputs": [slow, [1]]}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "Timeout", r.text
    assert time.monotonic() - t0 < 3 * REQUEST_TIMEOUT_S  # interrupted, not run to its end
    r = requests.post(batched.urls["http_port"], json={"inputs": [[[1, 2, 3, 4]], [1]]}, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][1] == [2]
    assert batched.stats()["healthy"] == 1


# -- autoscaling, and the archive from the object store --------------------------------------------


def _autoscaled(name: str, archive: Path, args: dict | None = None, **autoscaling: float) -> str:
    from ray import serve

    from tenfold.integration import app_builder

    scaling = {"min_replicas": 1, "max_replicas": 3, "target_utilization": 0.5, "upscale_delay_s": 1.0,
               "downscale_delay_s": 3.0, "look_back_period_s": 2.0, **autoscaling}
    serve.run(app_builder({"archive": str(archive), "interpreters": 2, "num_cpus": 0.25, "autoscaling": scaling,
                           "name": name, **(args or {})}), name=name, route_prefix=f"/{name}")
    return name


def _load(url: str, body: dict, clients: int, stop: threading.Event, failures: list[str]) -> list[threading.Thread]:
    def client() -> None:  # one request outstanding per client: the load is bounded
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(url, json=body, timeout=60)
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def test_the_deployed_policy_is_utilization_with_the_configured_target(serve_session, probe_archive: Path) -> None:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    name = _autoscaled("policy", probe_archive, target_utilization=0.35)
    try:
        details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
        config = details["applications"][name]["deployments"][name]["deployment_config"]["autoscaling_config"]
        assert config["policy"]["policy_function"] == "tenfold.integration.policy:UtilizationPolicy", config
        assert config["policy"]["policy_kwargs"] == {"target_utilization": 0.35}, config
    finally:
        serve.delete(name)


def test_interpreters_busy_at_low_concurrency_scale_up_and_back(serve_session, probe_archive: Path) -> None:
    from ray import serve

    # Two clients, each with one long call outstanding: 2 ongoing requests per replica is Serve's own target
    # (target_ongoing_requests), so its default policy would stay at 1 replica; the two interpreters are busy all
    # the time, 2x the target utilization.
    name = _autoscaled("busy", probe_archive)
    url, stop, failures, pids = f"{serve_session.url}/busy", threading.Event(), [], set()
    try:
        assert running_replicas(name, name) == 1
        started = time.monotonic()
        threads = _load(url, {"inputs": [[[SPIN, 400.0, 0.0, 0.0]], [1]]}, 2, stop, failures)
        try:
            wait_for(lambda: running_replicas(name, name) >= 2, 90, "a scale-up of busy interpreters")
            up_s = time.monotonic() - started
            # The new replica serves. Generous: on a loaded machine the proxy may learn of it many seconds late.
            deadline = time.monotonic() + 90
            while len(pids) < 2 and time.monotonic() < deadline:
                pids.add(requests.get(f"{url}/-/stats", timeout=30).json()["pid"])
        finally:
            stop.set()
            for t in threads:
                t.join()
        idle = time.monotonic()
        wait_for(lambda: running_replicas(name, name) == 1, 90, "a scale-down once idle")
        print(f"\nscaled 1 -> 2 replicas in {up_s:.1f} s under load, 2 -> 1 in {time.monotonic() - idle:.1f} s idle")
        assert not failures, failures[:3]
        assert len(pids) >= 2, pids
    finally:
        stop.set()
        serve.delete(name)


def test_many_short_requests_with_idle_interpreters_do_not_scale_up(serve_session, probe_archive: Path) -> None:
    from ray import serve

    # Six clients of calls that take the interpreters well under a millisecond, each request waiting a quarter of a
    # second in the replica for a batch of 8 to fill: 6 ongoing requests, three times Serve's own target
    # (target_ongoing_requests), which takes its default policy to 3 replicas; the interpreters are idle.
    name = _autoscaled("short", probe_archive, {"max_batch_size": 8, "batch_wait_timeout_s": 0.25})
    url, stop, failures = f"{serve_session.url}/short", threading.Event(), []
    threads = _load(url, {"inputs": [[[1.0, 2.0, 3.0, 4.0]], [1]]}, 6, stop, failures)
    try:
        deadline = time.monotonic() + 30.0  # past the 18 s a scale-up took in the busy test
        while time.monotonic() < deadline:
            assert running_replicas(name, name) == 1, "scaled up with idle interpreters"
            time.sleep(0.5)
        stats = requests.get(f"{url}/-/stats", timeout=30).json()
        assert stats["utilization"] < 0.2 and stats["calls"] > 10, stats
    finally:
        stop.set()
        for t in threads:
            t.join()
        serve.delete(name)
    assert not failures, failures[:3]


def prometheus_samples(name: str, **labels: str) -> list:
    """The samples of metric `name` (as Ray exports it, with or without its `ray_` prefix) whose labels
    include `labels`, read from this node's Prometheus endpoint."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name in (name, f"ray_{name}") and labels.items() <= s.labels.items()]


def test_replica_metrics_reach_prometheus_tagged_with_their_application(probe: SimpleNamespace) -> None:
    # 413 is answered by this application to this test alone: its count is known exactly.
    too_large = b" " * (MAX_REQUEST_BYTES + 1)
    for _ in range(3):
        r = requests.post(probe.url, data=too_large, headers={"Content-Type": codec.JSON_TYPE}, timeout=30)
        assert r.status_code == 413, r.text
    ok = [requests.post(probe.url, json={"inputs": [[[1, 2, 3, 4]], [1]]}, timeout=30) for _ in range(3)]
    assert [r.status_code for r in ok] == [200] * 3
    app = {"application": "probe", "deployment": "probe"}

    def errors_counted() -> list:
        found = prometheus_samples("tenfold_request_errors_total", **app, protocol="http", status="413")
        return found if found and sum(s.value for s in found) == 3 else []

    errors = wait_for(errors_counted, 60, "3 errors with status 413 counted for this application", interval_s=1.0)
    assert all(s.labels.get("replica") for s in errors)  # Serve's own tags
    latency = prometheus_samples("tenfold_request_latency_ms_count", **app, protocol="http")
    assert sum(s.value for s in latency) >= 6  # every request is timed, errors included
    buckets = prometheus_samples("tenfold_request_latency_ms_bucket", **app, protocol="http", le="+Inf")
    assert sum(s.value for s in buckets) == sum(s.value for s in latency)
    # Gauges are set at each health check (every 10 s by default).
    healthy = wait_for(lambda: prometheus_samples("tenfold_interpreters_healthy", **app), 60,
                       "the healthy-interpreters gauge of this application", interval_s=1.0)
    assert all(s.value == 2 for s in healthy), healthy
    utilization = prometheus_samples("tenfold_interpreter_utilization", **app)
    assert utilization and all(0.0 <= s.value <= 1.0 for s in utilization), utilization
    depth = prometheus_samples("tenfold_queue_depth", **app)
    assert depth and all(s.value >= 0 for s in depth), depth
    assert {s.labels["deployment"] for s in prometheus_samples("tenfold_request_latency_ms_count",
                                                                application="probe")} == {"probe"}
