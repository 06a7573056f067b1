"""Streaming models on a real local Ray Serve: items sent as they are produced, over HTTP (newline-delimited
JSON or server-sent events, on Serve's route and on http_port) and through handles with stream=True; errors
before the first item have their status and after it end the stream; a client that hangs up stops the model;
request_timeout_s bounds the wait for each item."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from support import free_port, wait_for
from testmodels import stream_models
from testmodels.stream_models import EXAMPLE, ended

from tenfold.integration import codec

pytestmark = pytest.mark.ray

REQUEST_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tenfold.packaging import save

    path = tmp_path_factory.mktemp("streams") / "ticks.pt"
    save(stream_models.ticks, path, example_inputs=EXAMPLE, name="ticks")
    return path


@pytest.fixture(scope="module")
def app(serve_session, archive: Path) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    from ray import serve

    from tenfold.integration import app_builder

    port = free_port()
    args = {"archive": str(archive), "interpreters": 2, "num_cpus": 0.5, "http_port": port, "http_host": "127.0.0.1",
            "request_timeout_s": REQUEST_TIMEOUT_S, "interrupt_grace_s": 1.0}
    handle = serve.run(app_builder(args), name="ticks", route_prefix="/ticks")
    yield SimpleNamespace(routes={"serve": f"{serve_session.url}/ticks", "http_port": f"http://127.0.0.1:{port}"},
                          handle=handle)
    serve.delete("ticks")


ROUTES = ["serve", "http_port"]


def token() -> int:
    return random.randrange(1, 2**31)


def post(url: str, inputs: list, **headers: str) -> requests.Response:
    return requests.post(url, json={"inputs": inputs}, headers=headers, stream=True, timeout=30)


@pytest.mark.parametrize("route", ROUTES)
def test_items_stream_as_newline_delimited_json(app: SimpleNamespace, route: str) -> None:
    t = token()
    with post(app.routes[route], [4, 0.0, -1, t]) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith(codec.NDJSON_TYPE)
        assert [json.loads(line) for line in r.iter_lines()] == [0, 1, 2, 3]
    assert ended(t) == "exhausted"


@pytest.mark.parametrize("route", ROUTES)
def test_items_stream_as_server_sent_events_when_asked(app: SimpleNamespace, route: str) -> None:
    with post(app.routes[route], [3, 0.0, -1, 0], Accept=codec.EVENT_STREAM_TYPE) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith(codec.EVENT_STREAM_TYPE)
        assert r.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


@pytest.mark.parametrize("route", ROUTES)
def test_each_item_arrives_as_it_is_produced_and_a_client_that_hangs_up_stops_the_model(
        app: SimpleNamespace, route: str) -> None:
    t = token()
    with post(app.routes[route], [-1, 0.05, -1, t]) as r:  # never ends by itself
        lines = r.iter_lines()
        assert [json.loads(next(lines)) for _ in range(3)] == [0, 1, 2]
        assert ended(t) is None
    # Closed between two items, or interrupted in the middle of one (TimeoutError raised in it): stopped either way.
    wait_for(lambda: ended(t) in ("closed", "TimeoutError"), 15, "the model's generator to stop", interval_s=0.05)
    with post(app.routes[route], [2, 0.0, -1, 0]) as r:  # its interpreter serves on
        assert [json.loads(line) for line in r.iter_lines()] == [0, 1]


@pytest.mark.parametrize("route", ROUTES)
def test_bad_inputs_and_a_model_failing_at_once_have_their_status(app: SimpleNamespace, route: str) -> None:
    r = post(app.routes[route], [2, 0.0])
    assert r.status_code == 422 and "the model takes 4 input(s)" in r.json()["error"]["message"]
    r = post(app.routes[route], ["two", 0.0, -1, 0])
    assert r.status_code == 422 and "input 0 ('count')" in r.json()["error"]["message"]
    r = post(app.routes[route], [2, 0.0, 0, 0])  # fails before its first item
    assert r.status_code == 500 and "tick 0 failed" in r.json()["error"]["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_an_error_after_the_first_item_ends_the_stream_with_it(app: SimpleNamespace, route: str) -> None:
    t = token()
    with post(app.routes[route], [5, 0.0, 2, t]) as r:
        assert r.status_code == 200
        *items, last = [json.loads(line) for line in r.iter_lines()]
    assert items == [0, 1]
    assert last["error"]["status"] == 500 and "ValueError: tick 2 failed" in last["error"]["message"]
    assert ended(t) == "ValueError"
    with post(app.routes[route], [5, 0.0, 1, 0], Accept=codec.EVENT_STREAM_TYPE) as r:
        events = r.text.split("\n\n")
    assert events[0] == "data: 0" and events[1].startswith("event: error\ndata: {")


@pytest.mark.parametrize("route", ROUTES)
def test_request_timeout_bounds_the_wait_for_each_item(app: SimpleNamespace, route: str) -> None:
    t = token()
    with post(app.routes[route], [3, 30.0, -1, t]) as r:  # the second tick would come after 30 s
        *items, last = [json.loads(line) for line in r.iter_lines()]
    assert items == [0]
    assert last["error"]["status"] == 504, last
    wait_for(lambda: ended(t) == "TimeoutError", 10, "the model to be interrupted", interval_s=0.05)


def test_handles_stream_python_values_with_stream_true(app: SimpleNamespace) -> None:
    t = token()
    assert list(app.handle.options(stream=True).remote(4, 0.0, -1, t)) == [0, 1, 2, 3]
    assert ended(t) == "exhausted"
    assert list(app.handle.options(stream=True).remote(count=2, period_s=0.0, fail_at=-1, token=0)) == [0, 1]
    got = []
    with pytest.raises(ValueError, match="tick 1 failed"):
        for item in app.handle.options(stream=True).remote(4, 0.0, 1, 0):
            got.append(item)
    assert got == [0]
    with pytest.raises(TypeError, match=r"stream=True"):
        app.handle.remote(2, 0.0, -1, 0).result(timeout_s=30)


def test_the_openapi_document_describes_the_stream(app: SimpleNamespace) -> None:
    doc = requests.get(f"{app.routes['serve']}/-/openapi.json", timeout=30).json()
    ok = doc["paths"]["/"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {codec.NDJSON_TYPE, codec.EVENT_STREAM_TYPE}
    assert ok["content"][codec.NDJSON_TYPE]["itemSchema"]["type"] == "integer"


def test_batching_a_streaming_model_is_refused_at_deploy(archive: Path) -> None:
    from tenfold.integration import DeployError, app_builder

    with pytest.raises(DeployError, match="streams .* each request is its own stream. Drop max_batch_size"):
        app_builder({"archive": str(archive), "max_batch_size": 4})


def test_the_text_generator_config_streams_its_tokens_over_both_routes(serve_session, tmp_path: Path) -> None:  # noqa: ANN001
    """configs/text_generator.yaml's application, with the example packaged here and a free port."""
    import sys

    import yaml
    from ray import serve
    from support import ROOT

    from tenfold.integration import app_builder
    from tenfold.packaging import save

    sys.path.insert(0, str(ROOT))
    try:
        from examples import text_generator
    finally:
        sys.path.remove(str(ROOT))
    archive = tmp_path / "text_generator.pt"
    save(text_generator.build, archive, example_inputs=text_generator.example_inputs())
    (config,) = yaml.safe_load((ROOT / "configs/text_generator.yaml").read_text())["applications"]
    port = free_port()
    args = {**config["args"], "archive": str(archive), "http_port": port}
    handle = serve.run(app_builder(args), name="text_generator", route_prefix="/text_generator")
    try:
        want = "".join(text_generator.build()("Once upon a time", 32))
        for url in (f"{serve_session.url}/text_generator", f"http://127.0.0.1:{port}"):
            with post(url, ["Once upon a time", 32]) as r:
                assert r.status_code == 200, r.text
                assert "".join(json.loads(line) for line in r.iter_lines()) == want
        assert "".join(handle.options(stream=True).remote("Once upon a time", 32)) == want
    finally:
        serve.delete("text_generator")
