"""Several models in one application (`archives: {name: ...}`): each picked per request by its path (/{name}), by
Serve's multiplexing header, or by `handle.options(multiplexed_model_id=...)`; loaded into every interpreter of a
replica on its first request, on Serve's route, handles and http_port alike; past `max_models_per_replica` the
least recently used one is unloaded, once the calls on it have ended, and its archive unmapped.

The application is deployed from a config as `serve deploy` applies one (the controller's `deploy_apps`), with
the `{name: path}` and `{name: {archive, sha256}}` forms of a YAML's args.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from support import file_sha256, free_port, mapped, running_replicas, wait_for
from testmodels import catalog_models

pytestmark = pytest.mark.ray

APP = "catalog"
NAMES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tenfold.packaging import save

    root = tmp_path_factory.mktemp("catalog")
    paths = {}
    for name in (*NAMES, "doomed"):
        paths[name] = root / f"{name}.pt"
        save(getattr(catalog_models, "alpha" if name == "doomed" else name), paths[name],
             example_inputs=catalog_models.example_inputs(), name=name)
    return paths


def deploy(applications: dict[str, dict[str, Any]]) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": list(applications.values())}))


@pytest.fixture(scope="module")
def app(serve_session, archives: dict[str, Path]) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    from ray import serve

    port = free_port()
    args = {
        "archives": {"alpha": str(archives["alpha"]),  # a local file needs no pin
                     "beta": {"archive": str(archives["beta"]), "sha256": file_sha256(archives["beta"])},
                     "gamma": {"archive": str(archives["gamma"]), "sha256": file_sha256(archives["gamma"])},
                     "doomed": str(archives["doomed"])},
        "max_models_per_replica": 2, "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "interpreters": 2,
        "num_cpus": 0.5, "http_port": port, "http_host": "127.0.0.1",
    }
    applications = {APP: {"name": APP, "route_prefix": f"/{APP}", "import_path": "tenfold.integration:app_builder",
                           "args": args}}
    deploy(applications)
    ns = SimpleNamespace(url=f"{serve_session.url}/{APP}", port_url=f"http://127.0.0.1:{port}", archives=archives,
                         handle=lambda: serve.get_app_handle(APP), applications=applications)
    wait_for(lambda: requests.get(f"{ns.url}/-/manifest", timeout=30).status_code == 200, 120, "the application")
    try:
        yield ns
    finally:
        serve.delete(APP)


def tag(url: str, model: str | None, *texts: str, header: str | None = None) -> list[dict[str, Any]]:
    path = f"{url}/{model}" if model else f"{url}/"
    r = requests.post(path, json={"inputs": [list(texts)]}, timeout=60,
                      headers={"serve_multiplexed_model_id": header} if header else {})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def stats(app: SimpleNamespace) -> dict[str, Any]:
    return requests.get(f"{app.url}/-/stats", timeout=30).json()


def held(app: SimpleNamespace) -> set[str]:
    return set(stats(app)["models"])


def test_each_model_answers_at_its_path_by_the_header_and_by_a_handle_on_every_route(app: SimpleNamespace) -> None:
    for url in (app.url, app.port_url):
        for name in ("alpha", "beta"):
            assert [o["model"] for o in tag(url, name, "x", "y")] == [name, name]
            assert tag(url, None, "z", header=name)[0]["model"] == name
    handle = app.handle()
    got = handle.options(multiplexed_model_id="beta").remote(["w"]).result(timeout_s=60)
    assert got[0]["model"] == "beta" and got[0]["text"] == "w"
    got = handle.options(multiplexed_model_id="alpha").remote(texts=["v"]).result(timeout_s=60)  # by name too
    assert got[0]["model"] == "alpha"
    # Serve's proxy takes the header with dashes too; so does http_port.
    r = requests.post(f"{app.port_url}/", json={"inputs": [["d"]]}, headers={"serve-multiplexed-model-id": "beta"},
                      timeout=60)
    assert r.json()["outputs"][0]["model"] == "beta"


def test_a_request_that_names_no_model_or_one_not_served_is_refused_with_the_names_served(
        app: SimpleNamespace) -> None:
    for url in (app.url, app.port_url):
        r = requests.post(f"{url}/", json={"inputs": [["x"]]}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["type"] == "ModelNotFound", r.text
        assert "POST /{name}" in r.text and "alpha, beta, doomed, gamma" in r.text
        r = requests.post(f"{url}/delta", json={"inputs": [["x"]]}, timeout=30)
        assert r.status_code == 404 and "no model 'delta' here" in r.text, r.text
        r = requests.post(f"{url}/", json={"inputs": [["x"]]}, headers={"serve_multiplexed_model_id": "delta"},
                          timeout=30)
        assert r.status_code == 404 and "no model 'delta' here" in r.text, r.text
        r = requests.post(f"{url}/alpha", json={"inputs": [["x"]]}, headers={"serve_multiplexed_model_id": "beta"},
                          timeout=30)
        assert r.status_code == 400 and "names model 'alpha'" in r.text and "'beta'" in r.text, r.text
        r = requests.post(f"{url}/alpha", json={"inputs": [[3]]}, timeout=30)
        assert r.status_code == 422 and "input 0 ('texts')" in r.text, r.text
        assert requests.get(f"{url}/alpha/-/stats", timeout=30).status_code == 404
    handle = app.handle()
    with pytest.raises(LookupError, match="multiplexed_model_id=NAME"):
        handle.remote(["x"]).result(timeout_s=60)
    with pytest.raises(LookupError, match="no model 'delta' here"):
        handle.options(multiplexed_model_id="delta").remote(["x"]).result(timeout_s=60)
    with pytest.raises(ValueError, match="texts"):
        handle.options(multiplexed_model_id="alpha").remote([3]).result(timeout_s=60)


def test_models_load_on_first_use_and_past_the_bound_the_least_recently_used_is_unloaded_with_its_weights(
        app: SimpleNamespace) -> None:
    pid = stats(app)["pid"]
    tag(app.url, "alpha", "a")
    tag(app.port_url, "beta", "b")  # loaded for a request on http_port: asked for by its interpreter, then served
    assert held(app) == {"alpha", "beta"}
    assert mapped(pid, app.archives["alpha"]) and mapped(pid, app.archives["beta"])
    # alpha is used on http_port: that counts as recent use, as on Serve's route.
    since = time.time()
    tag(app.port_url, "alpha", "a")
    wait_for(lambda: (stats(app)["models"]["alpha"]["used_at"] or 0) >= since, 10, "the use on http_port to count")
    tag(app.url, "gamma", "c")  # a third: beta, the least recently used, goes
    assert held(app) == {"alpha", "gamma"}
    wait_for(lambda: not mapped(pid, app.archives["beta"]), 30, "beta's archive to be unmapped")
    assert mapped(pid, app.archives["gamma"]) and mapped(pid, app.archives["alpha"])
    # Asked for again, it is loaded again, in place of alpha, now the least recently used.
    assert tag(app.port_url, "beta", "b")[0]["model"] == "beta"
    assert held(app) == {"gamma", "beta"} and stats(app)["pid"] == pid
    manifest = requests.get(f"{app.url}/-/manifest", timeout=30).json()
    assert manifest["max_models_per_replica"] == 2 and set(manifest["models"]) == {*NAMES, "doomed"}
    assert manifest["models"]["beta"]["sha256"] == file_sha256(app.archives["beta"])


@pytest.mark.parametrize("route", ["serve", "http_port"])
def test_a_model_unloaded_while_a_call_runs_keeps_its_weights_until_the_call_ends(
        app: SimpleNamespace, route: str) -> None:
    pid = stats(app)["pid"]
    tag(app.url, "gamma", "c")  # held, and not the least recently used next
    url = app.url if route == "serve" else app.port_url
    result: list[dict[str, Any]] = []
    slow = threading.Thread(target=lambda: result.extend(tag(url, "beta", f"{catalog_models.HOLD}3")))
    slow.start()
    wait_for(lambda: stats(app)["models"].get("beta", {}).get("requests") == 1, 30, "the slow call to hold beta")
    tag(app.url, "gamma", "c")
    # beta is the least recently used: alpha's first request unloads it while its call runs (and alpha's load waits
    # for the interpreter that runs it, if that call is on its queue).
    loading = threading.Thread(target=tag, args=(app.url, "alpha", "a"))
    loading.start()
    wait_for(lambda: "beta" not in held(app), 30, "beta to be unloaded")
    assert mapped(pid, app.archives["beta"]) and slow.is_alive()  # its weights stay while the call runs
    slow.join(60)
    loading.join(60)
    assert result and result[0]["model"] == "beta"
    wait_for(lambda: not mapped(pid, app.archives["beta"]), 30, "beta's archive to be unmapped once its call ended")


def test_a_model_unloaded_while_a_requests_body_arrives_serves_that_request(app: SimpleNamespace) -> None:
    import socket
    from urllib.parse import urlsplit

    body = b'{"inputs": [["late"]]}'
    where = urlsplit(app.url)
    with socket.create_connection((where.hostname, where.port), timeout=60) as conn:
        conn.sendall(f"POST {where.path}/beta HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:5])
        # The request holds beta (its body still on its way) when alpha's first request unloads it.
        wait_for(lambda: stats(app)["models"].get("beta", {}).get("requests") == 1, 30, "the request to hold beta")
        tag(app.url, "gamma", "c")  # (the request made beta the most recently used)
        tag(app.url, "alpha", "a")
        assert "beta" not in held(app)
        conn.sendall(body[5:])
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and b'"model": "beta"' in answer, answer[:500]


def test_batching_joins_requests_to_one_model_and_never_across_models(app: SimpleNamespace) -> None:
    handle = app.handle()

    def call(i: int) -> list[dict[str, Any]]:
        name = ("alpha", "gamma")[i % 2]
        return handle.options(multiplexed_model_id=name).remote([f"t{i}", "u"]).result(timeout_s=60)

    tag(app.url, "alpha", "a"), tag(app.url, "gamma", "c")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(16)))
    for i, result in enumerate(results):
        assert [r["model"] for r in result] == [("alpha", "gamma")[i % 2]] * 2 and result[0]["text"] == f"t{i}"
    assert max(r[0]["batch"] for r in results) > 2  # several requests' items in one call, of one model


def test_a_model_that_cannot_be_loaded_is_a_503_that_says_why_and_the_others_serve_on(
        app: SimpleNamespace) -> None:
    doomed = app.archives["doomed"].read_bytes()
    app.archives["doomed"].unlink()  # gone after the deploy: no replica can map it, nor read it on this node
    for url in (app.url, app.port_url):
        r = requests.post(f"{url}/doomed", json={"inputs": [["x"]]}, timeout=120)
        assert r.status_code == 503 and r.json()["error"]["type"] == "ModelUnavailable", r.text
        assert "'doomed' could not be loaded on this replica" in r.text and "doomed.pt" in r.text, r.text
        assert tag(url, "alpha", "a")[0]["model"] == "alpha"
    with pytest.raises(Exception, match="could not be loaded"):
        app.handle().options(multiplexed_model_id="doomed").remote(["x"]).result(timeout_s=120)
    # Put back, the next request loads it.
    app.archives["doomed"].write_bytes(doomed)
    assert tag(app.port_url, "doomed", "x")[0]["model"] == "alpha"


def test_the_openapi_document_gives_every_models_routes_and_validation_agrees_with_it(app: SimpleNamespace) -> None:
    for url in (app.url, app.port_url):
        doc = requests.get(f"{url}/-/openapi.json", timeout=30).json()
        assert {f"/{n}" for n in (*NAMES, "doomed")} <= set(doc["paths"]), doc["paths"].keys()
        body = doc["paths"]["/beta"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["inputs"]["oneOf"][0]["prefixItems"][0]["items"] == {"type": "string"}
        own = requests.get(f"{url}/beta/-/openapi.json", timeout=30).json()
        assert set(own["paths"]) >= {"/"} and own["info"]["version"] == file_sha256(app.archives["beta"])[:12]
        assert requests.get(f"{url}/beta/-/manifest", timeout=30).json()["sha256"] == file_sha256(app.archives["beta"])
        # What the document refuses (a number where a string goes) is a 422; what it takes is a 200.
        assert requests.post(f"{url}/beta", json={"inputs": [[0]]}, timeout=30).status_code == 422
        assert requests.post(f"{url}/beta", json={"inputs": {"texts": ["0"]}}, timeout=30).status_code == 200


def test_serves_router_sends_a_models_requests_to_the_replica_that_holds_it(
        app: SimpleNamespace, serve_session, archives: dict[str, Path]) -> None:  # noqa: ANN001
    from ray import serve

    name = "catalog-two"
    # Two replicas that hold one model each: requests for two models in turn settle one model on each replica.
    # Routed at random, about every other request would find the other model loaded, and load its own.
    # (Deployed with the module's application: a config deploy removes the applications it leaves out.)
    app.applications[name] = {
        "name": name, "route_prefix": f"/{name}", "import_path": "tenfold.integration:app_builder",
        "args": {"archives": {n: str(archives[n]) for n in NAMES}, "num_replicas": 2, "max_models_per_replica": 1,
                 "interpreters": 1, "num_cpus": 0.5}}
    deploy(app.applications)
    try:
        url = f"{serve_session.url}/{name}"
        wait_for(lambda: running_replicas(name, "models") == 2, 120, "both replicas")

        def in_turn() -> dict[str, set[int]] | None:
            pids: dict[str, set[int]] = {"alpha": set(), "beta": set()}
            for _ in range(10):
                for model in pids:
                    pids[model].add(tag(url, None, "x", header=model)[0]["pid"])
            settled = all(len(p) == 1 for p in pids.values()) and pids["alpha"] != pids["beta"]
            return pids if settled else None

        settled = wait_for(in_turn, 60, "each model's requests to settle on a replica of its own")
        assert in_turn() == settled
    finally:
        del app.applications[name]
        serve.delete(name)


def test_a_corrupt_archive_or_one_that_cannot_batch_is_refused_at_deploy_by_its_name(
        archives: dict[str, Path], tmp_path: Path) -> None:
    from testmodels import serve_models

    from tenfold.integration import DeployError, app_builder
    from tenfold.packaging import save

    data = bytearray(archives["gamma"].read_bytes())
    data[data.rfind(bytes.fromhex("00004040") * 4)] ^= 0x01  # in gamma's weights (float32 3.0)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(DeployError, match=r"refusing to deploy archives\['gamma'\]: .*corrupt\.pt"):
        app_builder({"archives": {"alpha": str(archives["alpha"]), "gamma": str(corrupt)}})
    fixed = tmp_path / "fixed.pt"  # a tensor model without a batch dimension
    save(serve_models.probe, fixed, example_inputs=serve_models.example_inputs(), dynamic={"x": [], "k": []})
    with pytest.raises(DeployError, match=r"archives\['fixed'\]: max_batch_size needs a dynamic first"):
        app_builder({"archives": {"alpha": str(archives["alpha"]), "fixed": str(fixed)}, "max_batch_size": 4})
