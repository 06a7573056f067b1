"""The OpenAPI document a replica serves is its contract: bodies that its request schema accepts are answered
200, bodies that it rejects 4xx, none 5xx. Bodies are generated from the served document itself (valid ones by
`from_schema` here, invalid ones by putting random JSON in one input of a valid body), on both routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import free_port

pytestmark = pytest.mark.ray

JSON = {"Content-Type": "application/json"}
finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | finite | st.text(max_size=10)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


def from_schema(schema: dict[str, Any], root: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Values valid under `schema`, for the JSON Schema keywords pydantic and tenfold's documents use."""
    root = root or schema
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return from_schema(node, root)
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema.get("anyOf", schema.get("oneOf"))])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**40)), schema.get("maximum", 2**40))
    if kind == "number":
        return finite
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 10))
    if kind == "array":
        if "prefixItems" in schema:
            return st.tuples(*(from_schema(s, root) for s in schema["prefixItems"])).map(list)
        return st.lists(from_schema(schema.get("items", {}), root), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object":
        properties, required = schema.get("properties", {}), set(schema.get("required", []))
        if not properties:
            return st.dictionaries(st.text(max_size=6), from_schema(schema.get("additionalProperties", {}), root),
                                   max_size=4)
        return st.fixed_dictionaries({k: from_schema(v, root) for k, v in properties.items() if k in required},
                                     optional={k: from_schema(v, root) for k, v in properties.items()
                                               if k not in required})
    return json_values  # no type: anything


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def contract(serve_session, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    from ray import serve
    from testmodels import value_models

    from tenfold.integration import app_builder
    from tenfold.packaging import save

    archive = Path(tmp_path_factory.mktemp("contract")) / "contract.pt"
    save(value_models.contract(), archive, example_inputs=value_models.CONTRACT_EXAMPLE, name="contract")
    port = free_port()
    serve.run(app_builder({"archive": str(archive), "name": "contract", "interpreters": 1, "num_cpus": 0.5,
                           "http_port": port}), name="contract", route_prefix="/contract")
    try:
        doc = requests.get(f"http://127.0.0.1:{port}/-/openapi.json", timeout=30).json()
        body = doc["paths"]["/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        schema = {**body, "components": doc["components"]}  # its $refs point into the document's components
        jsonschema.Draft202012Validator.check_schema(schema)
        yield SimpleNamespace(routes=[f"{serve_session.url}/contract", f"http://127.0.0.1:{port}/"], schema=schema,
                              validator=jsonschema.Draft202012Validator(schema))
    finally:
        serve.delete("contract")


def _answer(route: str, body: Any) -> requests.Response:
    return requests.post(route, data=json.dumps(body), headers=JSON, timeout=30)


@SETTINGS
@given(data=st.data())
def test_every_body_the_served_schema_accepts_is_answered_200(contract: SimpleNamespace, data: st.DataObject) -> None:
    body = data.draw(from_schema(contract.schema), label="body")
    for route in contract.routes:
        r = _answer(route, body)
        assert r.status_code == 200, (route, body, r.text)


@SETTINGS
@given(data=st.data())
def test_a_body_the_served_schema_rejects_is_a_4xx_and_none_is_a_5xx(contract: SimpleNamespace,
                                                                    data: st.DataObject) -> None:
    body = data.draw(from_schema(contract.schema), label="valid body")
    inputs = body["inputs"]
    keys = list(inputs) if isinstance(inputs, dict) else list(range(len(inputs)))
    key = data.draw(st.sampled_from(keys), label="input")
    # Near misses first: what a lax validator converts (0 for a bool, "3" for an int), then anything.
    inputs[key] = data.draw(st.sampled_from([0, 1, "true", "3", "0.5", 3.5, "", [], {}]) | json_values,
                            label="its value")
    valid = contract.validator.is_valid(body)
    for route in contract.routes:
        r = _answer(route, body)
        assert r.status_code < 500, (route, body, r.text)
        assert (r.status_code == 200) == valid, (route, body, valid, r.status_code, r.text)
        if not valid:
            assert r.status_code == 422 and "input" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(("name", "value"), [("flag", 0), ("flag", "true"), ("count", "3"), ("ratio", "0.5"),
                                           ("tags", "a"), ("count", 101), ("name", "longer than eight")])
def test_values_a_lax_validator_would_convert_are_refused_as_the_schema_says(contract: SimpleNamespace, name: str,
                                                                            value: Any) -> None:
    from testmodels import value_models

    body = {"inputs": {**value_models.CONTRACT_BY_NAME, name: value}}
    assert not contract.validator.is_valid(body)
    for route in contract.routes:
        assert _answer(route, {"inputs": value_models.CONTRACT_BY_NAME}).status_code == 200
        r = _answer(route, body)
        assert r.status_code == 422 and repr(name) in r.json()["error"]["message"], (route, r.text)
