"""Fuzzed requests to a real replica: malformed JSON, wrong types, NaN and infinities,
huge and empty arrays, wrong Arrow schemas and random bytes, with each content type.

Every answer must be a 4xx with a JSON error body, or a 200 where the input is valid; a valid request
sent after every fuzzed one must get the right answer; the replica must never restart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from testmodels import reliability_models as models

from tenfold.integration import codec

pytestmark = pytest.mark.ray

LIMIT = 16 * 1024  # max_request_bytes of the fuzzed app: "huge" arrays cross it cheaply
CONTENT_TYPES = [codec.JSON_TYPE, codec.ARROW_TYPE, f"{codec.JSON_TYPE}; charset=utf-8", "text/plain", None]
FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def app(serve_session, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    from ray import serve

    from tenfold.integration import app_builder
    from tenfold.packaging import save

    archive = tmp_path_factory.mktemp("fuzz") / "healthy.pt"
    save(models.Healthy, archive, example_inputs=models.example_inputs(), name="healthy")
    serve.run(app_builder({"archive": str(archive), "name": "fuzz", "interpreters": 2, "num_cpus": 0.5,
                           "max_request_bytes": LIMIT}), name="fuzz", route_prefix="/fuzz")
    try:
        url = f"{serve_session.url}/fuzz"
        yield SimpleNamespace(url=url, pid=requests.get(f"{url}/-/stats", timeout=30).json()["pid"], valid=[0])
    finally:
        serve.delete("fuzz")


# -- what to send ----------------------------------------------------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | floats | st.text(max_size=6)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=24,
)


@st.composite
def matrices(draw: st.DrawFn, elements: st.SearchStrategy, max_rows: int = 6) -> list:
    rows = draw(st.integers(0, max_rows))
    cols = draw(st.sampled_from([0, 1, 3, 4, 4, 4, 5]))
    return [[draw(elements) for _ in range(cols)] for _ in range(rows)]


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()  # NaN and inf become NaN / Infinity tokens, which Python's json reads


@st.composite
def json_requests(draw: st.DrawFn) -> tuple[str | None, bytes]:
    kind = draw(st.sampled_from(["doc", "inputs", "numbers", "wrong_types", "huge", "truncated", "text"]))
    if kind == "doc":
        payload = body(draw(json_values))
    elif kind == "inputs":
        payload = body({"inputs": draw(json_values)})
    elif kind == "numbers":  # NaN, infinities, out-of-range floats, wrong and empty shapes
        payload = body({"inputs": [draw(matrices(floats | st.integers(-(2**40), 2**40)))]})
    elif kind == "wrong_types":
        payload = body({"inputs": [draw(matrices(scalars))] * draw(st.integers(0, 3))})
    elif kind == "huge":
        rows = draw(st.integers(100, 1500))
        payload = body({"inputs": [[[1.5, -2.0, 3.25, 0.0]] * rows]})
    elif kind == "truncated":
        whole = body({"inputs": [draw(matrices(floats))]})
        payload = whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    else:
        payload = draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    return draw(st.sampled_from([codec.JSON_TYPE, f"{codec.JSON_TYPE}; charset=utf-8", None])), payload


ARROW_TYPES = [pa.float32(), pa.float64(), pa.int8(), pa.int64(), pa.bool_(), pa.string()]


@st.composite
def arrow_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    rows = draw(st.integers(0, 5))
    columns, names = [], []
    for _ in range(draw(st.integers(0, 3))):
        names.append(draw(st.sampled_from(["x", "x", "y", ""])))
        width = draw(st.sampled_from([None, 3, 4, 4]))
        value_type = draw(st.sampled_from(ARROW_TYPES))
        if value_type == pa.string():
            columns.append(pa.array([draw(st.text(max_size=4)) for _ in range(rows)], pa.string()))
            continue
        values = np.array([draw(floats) for _ in range(rows * (width or 1))], dtype=np.float64)
        with np.errstate(all="ignore"):
            values = np.nan_to_num(values) if value_type != pa.float64() and value_type != pa.float32() else values
            array = values.astype(value_type.to_pandas_dtype())
        if width is None:
            columns.append(pa.array(array, type=value_type))
        else:
            # from_storage, not from_numpy_ndarray: that refuses zero rows, which a client may still send
            storage = pa.FixedSizeListArray.from_arrays(pa.array(array, type=value_type), width)
            columns.append(pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(value_type, [width]), storage))
    if draw(st.booleans()) and columns and rows and not isinstance(columns[0].type, pa.FixedShapeTensorType):
        columns[0] = pa.array([None] * rows, type=columns[0].type)  # nulls
    sink = pa.BufferOutputStream()
    table = pa.table(columns, names=names) if columns else pa.table({})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    payload = sink.getvalue().to_pybytes()
    if draw(st.booleans()):
        payload = payload[: draw(st.integers(0, len(payload)))]  # truncated stream
    return codec.ARROW_TYPE, payload


def arrow_body(x: np.ndarray) -> bytes:
    """An Arrow request with one fixed_shape_tensor column "x" (zero rows allowed)."""
    storage = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    column = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.from_numpy_dtype(x.dtype), [x.shape[1]]), storage)
    table = pa.table([column], names=["x"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


random_bytes = st.tuples(st.sampled_from(CONTENT_TYPES), st.binary(max_size=512))
fuzzed = json_requests() | arrow_requests() | random_bytes


# -- the property ----------------------------------------------------------------------------------


def check_answer(r: requests.Response) -> None:
    """A 200 with outputs, or a 4xx whose JSON body names its status."""
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code == 200:
        if r.headers["content-type"] == codec.ARROW_TYPE:
            outputs = codec.decode_arrow_outputs(r.content)
            assert len(outputs) == 1
        else:
            (y,) = r.json()["outputs"]
            assert all(len(row) == 3 for row in y)
    else:
        error = r.json()["error"]
        assert error["status"] == r.status_code and error["message"], error


def valid_call(app: SimpleNamespace, rng_seed: int) -> None:
    """One valid request (JSON and Arrow in turn) that must get exactly the model's answer."""
    x = np.random.default_rng(rng_seed).uniform(-10, 10, size=(1 + rng_seed % 3, 4)).astype(np.float32)
    if rng_seed % 2:
        r = requests.post(app.url, json={"inputs": [x.tolist()]}, timeout=60)
        assert r.status_code == 200, r.text
        y = np.array(r.json()["outputs"][0])
    else:
        r = requests.post(app.url, data=codec.encode_arrow_inputs([x], ["x"]),
                          headers={"Content-Type": codec.ARROW_TYPE}, timeout=60)
        assert r.status_code == 200, r.text
        y = next(iter(codec.decode_arrow_outputs(r.content).values()))
    np.testing.assert_allclose(y, models.expected(x.tolist()), rtol=1e-5, atol=1e-6)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=fuzzed)
@example(request=(codec.JSON_TYPE, b"[" * 5000))  # nesting deeper than the JSON parser's recursion limit
@example(request=(codec.JSON_TYPE, b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"))
@example(request=(codec.ARROW_TYPE, arrow_body(np.zeros((0, 4), np.float32))))  # zero rows, valid otherwise
@example(request=(codec.JSON_TYPE, b'{"inputs": [[[NaN, Infinity, -Infinity, 1e39]]]}'))
@example(request=(codec.JSON_TYPE, b'{"inputs": [[]]}'))
@example(request=(codec.ARROW_TYPE, b""))
@example(request=(codec.JSON_TYPE, b"\xff" * (LIMIT + 1)))
def fuzz_one(app: SimpleNamespace, request: tuple[str | None, bytes]) -> None:
    """One fuzzed request, then one valid request."""
    media, payload = request
    headers = {"Content-Type": media} if media else {}
    r = requests.post(app.url, data=payload, headers=headers, timeout=60)
    check_answer(r)
    if len(payload) > LIMIT:
        assert r.status_code == 413
    app.valid[0] += 1
    valid_call(app, app.valid[0])


def test_fuzzed_requests_get_a_4xx_or_a_200_and_valid_ones_keep_working_in_the_same_replica(
        app: SimpleNamespace) -> None:
    before = requests.get(f"{app.url}/-/stats", timeout=30).json()
    valid = app.valid[0]
    fuzz_one(app)
    after = requests.get(f"{app.url}/-/stats", timeout=30).json()
    assert app.valid[0] - valid >= 150  # every example ran, each followed by a valid call that was answered right
    # The same process served them all: no request crashed or restarted the replica.
    assert after["pid"] == before["pid"] == app.pid
    assert after["healthy"] == after["size"] == 2
    assert after["calls"] - before["calls"] >= app.valid[0] - valid


def test_valid_json_with_nan_and_infinities_is_served(app: SimpleNamespace) -> None:
    x = [[math.nan, math.inf, -math.inf, 1.0], [FLOAT32_MAX, -FLOAT32_MAX, 0.0, 1.0]]
    r = requests.post(app.url, data=body({"inputs": [x]}), headers={"Content-Type": codec.JSON_TYPE}, timeout=60)
    check_answer(r)
    assert r.status_code == 200
    y = np.array(r.json()["outputs"][0])
    np.testing.assert_allclose(y, models.expected(x), rtol=1e-5, equal_nan=True)


def test_codec_answers_zero_rows_and_refuses_deep_nesting_as_a_400() -> None:
    # What the fuzz found first: both were 500s.
    body = codec.encode_arrow([np.zeros((0, 3), np.float32)], ["y"])
    assert codec.decode_arrow_outputs(body)["y"].shape == (0, 3)
    with pytest.raises(codec.MalformedRequest, match="nested too deeply"):
        codec.decode_json(b"[" * 5000, [])
