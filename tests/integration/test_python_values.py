"""Python-valued models on a real Ray Serve: strings in and out over HTTP (by position and by name) and
through handles, validation as 422s, and the OpenAPI document of `POST /` built from the manifest."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import requests
import torch
from support import free_port

import tenfold.packaging as tp

pytestmark = pytest.mark.ray

TEXTS = ["Several interpreters share one process.", "Fresh bread and cinnamon.", "ünïcode ✓"]


@contextmanager
def deployed(serve_session, archive: Path, name: str, interpreters: int) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    """`archive` served as application `name` at /`name`: its URL, a handle, and the model loaded in this process."""
    from ray import serve

    from tenfold.integration import app_builder

    app = app_builder({"archive": str(archive), "interpreters": interpreters, "num_cpus": 0.5, "name": name})
    handle = serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        yield SimpleNamespace(url=f"{serve_session.url}/{name}", handle=handle, host=tp.load(archive))
    finally:
        serve.delete(name)


@pytest.fixture(scope="module")
def embedder(serve_session, minilm_archive: Path) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    with deployed(serve_session, minilm_archive, "embedder", 2) as app:
        yield app


@pytest.fixture(scope="module")
def search(serve_session, search_archive: Path) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    with deployed(serve_session, search_archive, "search", 1) as app:
        yield app


def close(got: list, want: list) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_strings_in_embeddings_out_by_position_and_by_name(embedder: SimpleNamespace) -> None:
    want = embedder.host(TEXTS)
    for body in ({"inputs": [TEXTS]}, {"inputs": {"texts": TEXTS}}):
        r = requests.post(embedder.url, json=body, timeout=60)
        assert r.status_code == 200, r.text
        close(r.json()["outputs"], want)


def test_handles_take_and_return_the_python_values(embedder: SimpleNamespace) -> None:
    got = embedder.handle.remote(TEXTS).result(timeout_s=60)
    assert isinstance(got, list) and isinstance(got[0][0], float)
    close(got, embedder.host(TEXTS))


@pytest.mark.parametrize(("body", "message"), [
    ({"inputs": [[1, 2]]}, "input 0 ('texts') must be list[str]; at [0]: Input should be a valid string"),
    ({"inputs": ["one text"]}, "input 0 ('texts') must be list[str]; Input should be a valid list"),
    ({"inputs": {"text": TEXTS}}, "inputs by name must be exactly ['texts']"),
    ({"inputs": [TEXTS, 1]}, "the model takes 1 input(s) (texts: list[str]), got 2"),
])
def test_a_mistyped_value_is_a_422_naming_it(embedder: SimpleNamespace, body: dict, message: str) -> None:
    r = requests.post(embedder.url, json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "InvalidInput" and message in r.json()["error"]["message"]


def test_arrow_is_refused_for_python_values_with_a_415(embedder: SimpleNamespace) -> None:
    r = requests.post(embedder.url, data=b"\xff", headers={"Content-Type": "application/vnd.apache.arrow.stream"},
                      timeout=60)
    assert r.status_code == 415 and "takes Python values (texts: list[str])" in r.json()["error"]["message"]


def test_the_openapi_document_describes_requests_answers_and_errors(embedder: SimpleNamespace,
                                                                    search: SimpleNamespace) -> None:
    for app, valid, invalid in (
        (embedder, {"inputs": [TEXTS]}, {"inputs": [[3]]}),
        (search, {"inputs": {"query": "replicas", "k": 2}}, {"inputs": {"query": "replicas", "k": 0}}),
    ):
        doc = requests.get(f"{app.url}/-/openapi.json", timeout=30).json()
        assert doc["openapi"] == "3.1.0"
        post = doc["paths"]["/"]["post"]
        assert {"200", "400", "413", "422", "500", "503", "504"} <= set(post["responses"])

        def schema(node: dict, doc: dict = doc) -> dict:
            return {**node, "components": doc["components"]}  # its refs resolve from the same root

        request = schema(post["requestBody"]["content"]["application/json"]["schema"])
        jsonschema.validate(valid, request)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(invalid, request)
        answer = requests.post(app.url, json=valid, timeout=60)
        assert answer.status_code == 200, answer.text
        jsonschema.validate(answer.json(), schema(post["responses"]["200"]["content"]["application/json"]["schema"]))
        refused = requests.post(app.url, json=invalid, timeout=60)
        assert refused.status_code == 422
        jsonschema.validate(refused.json(), schema(post["responses"]["422"]["content"]["application/json"]["schema"]))


def test_semantic_search_answers_typed_hits_over_http_and_handles(search: SimpleNamespace) -> None:
    query = "How do I serve a model on many machines?"
    r = requests.post(search.url, json={"inputs": [query, 3]}, timeout=60)
    assert r.status_code == 200, r.text
    hits = r.json()["outputs"]
    assert [h["text"] for h in hits] == [h["text"] for h in search.host(query, 3)]
    assert hits[0]["text"].startswith("Ray Serve scales") and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert search.handle.remote(query, 1).result(timeout_s=60) == search.host(query, 1)
    r = requests.post(search.url, json={"inputs": [query, 99]}, timeout=60)
    assert r.status_code == 422 and "input 1 ('k') must be int (>= 1, <= 24)" in r.json()["error"]["message"]


def test_batching_a_model_that_does_not_map_a_list_to_a_list_is_refused_at_deploy(search_archive: Path) -> None:
    from tenfold.integration import DeployError, app_builder

    with pytest.raises(DeployError, match=r"takes \(query: str, k: int.*neither. Drop max_batch_size"):
        app_builder({"archive": str(search_archive), "max_batch_size": 8})


@pytest.fixture(scope="module")
def batched(serve_session, minilm_archive: Path) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    from ray import serve

    from tenfold.integration import app_builder

    port = free_port()
    app = app_builder({"archive": str(minilm_archive), "interpreters": 2, "num_cpus": 0.5, "name": "batched",
                       "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "http_port": port,
                       "http_host": "127.0.0.1"})
    handle = serve.run(app, name="batched", route_prefix="/batched")
    url = f"{serve_session.url}/batched"

    def calls(route: str) -> int:
        """Model calls so far: every call, or those of http_port's servers."""
        stats = requests.get(f"{url}/-/stats", timeout=30).json()
        return stats["calls"] if route == "serve" else stats["http_port"]["model_calls"]

    try:
        yield SimpleNamespace(url=url, urls={"serve": url, "http_port": f"http://127.0.0.1:{port}"}, handle=handle,
                              host=tp.load(minilm_archive), calls=calls)
    finally:
        serve.delete("batched")


@pytest.mark.parametrize("route", ["serve", "http_port"])
def test_concurrent_requests_are_joined_into_calls_and_each_gets_its_own_results_back(
        batched: SimpleNamespace, route: str) -> None:
    requests_texts = [[f"text {i} of request {r}" for i in range(1 + r % 3)] for r in range(12)]
    before = batched.calls(route)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda texts: requests.post(batched.urls[route], json={"inputs": {"texts": texts}},
                                                            timeout=60), requests_texts))
    calls = batched.calls(route) - before
    for texts, r in zip(requests_texts, answers):
        assert r.status_code == 200, r.text
        close(r.json()["outputs"], batched.host(texts))  # its slice, whole and in order
    assert calls < len(requests_texts), calls  # joined: fewer model calls than requests
    # Handles too, by position and by name.
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda t: batched.handle.remote(texts=t).result(timeout_s=60), requests_texts[:6]))
    for texts, got in zip(requests_texts, results):
        close(got, batched.host(texts))


@pytest.mark.parametrize("route", ["serve", "http_port"])
def test_one_bad_request_in_a_batch_fails_alone(batched: SimpleNamespace, route: str) -> None:
    bodies = [{"inputs": [["fine", "also fine"]]}, {"inputs": [["good", 7]]}, {"inputs": [["fine too"]]},
              {"inputs": ["not a list"]}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: requests.post(batched.urls[route], json=b, timeout=60), bodies))
    assert [a.status_code for a in answers] == [200, 422, 200, 422], [a.text for a in answers]
    assert "input 0 ('texts')" in answers[1].json()["error"]["message"]
    close(answers[0].json()["outputs"], batched.host(["fine", "also fine"]))
    with pytest.raises(ValueError, match=r"input 0 \('texts'\)"):
        batched.handle.remote([3]).result(timeout_s=60)


def test_memory_a_large_request_took_is_given_back(serve_session, tmp_path: Path) -> None:  # noqa: ANN001
    import psutil
    from ray import serve
    from support import wait_for

    from examples import echo
    from tenfold.integration import app_builder

    archive = tmp_path / "echo.pt"
    tp.save(echo.build(), archive, example_inputs=echo.example_inputs())
    port = free_port()
    serve.run(app_builder({"archive": str(archive), "interpreters": 2, "num_cpus": 0.5, "name": "big",
                           "http_port": port, "max_request_bytes": 32 << 20, "health_check_period_s": 1.0}),
              name="big", route_prefix="/big")
    try:
        url, direct = f"{serve_session.url}/big", f"http://127.0.0.1:{port}/"
        replica = psutil.Process(requests.get(f"{url}/-/stats", timeout=30).json()["pid"])

        def private_mb() -> float:  # the object store's shared pages, which large bodies pass through, are not ours
            return replica.memory_full_info().uss / 2**20

        def post(route: str) -> None:
            r = requests.post(route, data=body, headers={"Content-Type": "application/json"}, timeout=120)
            assert r.status_code == 200 and len(r.content) > 25 << 20

        # The interpreters' own route: what Ray's path to the host keeps of a body is Ray's (see the README).
        assert requests.post(direct, json={"inputs": ["warm"]}, timeout=30).status_code == 200
        before = private_mb()
        body = b'{"inputs": ["' + b"x" * (25 << 20) + b'"]}'
        post(direct)
        post(direct)
        grown = private_mb() - before
        # Each interpreter's malloc gives back what the request freed, at once or when the health check (every
        # second here) trims it: all of it, where glibc's defaults kept 60 MB and more a request (measured).
        wait_for(lambda: private_mb() - before < 40, 20,
                 f"the replica's private memory to come back within 40 MB (it grew by {grown:.0f} MB)")
    finally:
        serve.delete("big")
