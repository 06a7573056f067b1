"""Python values as JSON: a schema inferred from an example value, a value checked against a schema, and a
model's result turned into JSON (tensors and arrays as nested lists, numpy scalars as numbers)."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

BYTES_SCHEMA = {"type": "string", "contentEncoding": "base64"}


def infer(value: Any) -> tuple[str, dict[str, Any]]:
    """(Python type as text, JSON Schema) of an example value, for a callable without type hints."""
    if value is None:
        return "None", {"type": "null"}
    if isinstance(value, bool):
        return "bool", {"type": "boolean"}
    if isinstance(value, int):
        return "int", {"type": "integer"}
    if isinstance(value, float):
        return "float", {"type": "number"}
    if isinstance(value, str):
        return "str", {"type": "string"}
    if isinstance(value, (bytes, bytearray)):
        return "bytes", dict(BYTES_SCHEMA)
    if _is_array(value):
        return f"array[{value.dtype}]", {"type": "array"}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("dict keys must be strings to travel as JSON")
        inner = _merge([infer(v) for v in value.values()])
        return f"dict[str, {inner[0]}]", {"type": "object", "additionalProperties": inner[1]}
    if isinstance(value, (list, tuple)):
        inner = _merge([infer(v) for v in value])
        return f"list[{inner[0]}]", {"type": "array", "items": inner[1]}
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return infer(value.item())  # a numpy scalar or a 0-d tensor
    raise TypeError(f"a {type(value).__name__} is not a JSON value (str, int, float, bool, None, list, dict, bytes); "
                    "add a type hint that pydantic understands, or pass one of those")


def _merge(items: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """One (type, schema) for the elements of a container: their common one, `int | float` widened to float."""
    if not items:
        return "Any", {}
    kinds = {t for t, _ in items}
    if kinds <= {"int", "float"} and len(kinds) == 2:
        return "float", {"type": "number"}
    if len(kinds) == 1:
        return items[0]
    unique = list({t: s for t, s in items}.items())
    return " | ".join(t for t, _ in unique), {"anyOf": [s for _, s in unique]}


def _validator(schema: dict[str, Any]) -> Any:
    """The validator of `schema`, made once per distinct schema (`jsonschema.validate` checks the schema itself on
    every call). Keyed by the schema's text: each call that crosses into an interpreter brings its own copy of
    the same schema, and keying by object kept one validator per request."""
    return _validator_of(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _validator_of(text: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads(text))


def validate(schema: dict[str, Any], value: Any, where: str, expected: str) -> None:
    """ValueError naming `where` and the `expected` type unless the JSON value `value` fits `schema`."""
    import jsonschema

    try:
        error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(to_json(value)))
        if error is not None:
            raise error
    except jsonschema.ValidationError as exc:
        at = "".join(f"[{p!r}]" for p in exc.absolute_path)
        raise ValueError(f"{where} must be {expected}; {('at ' + at + ': ') if at else ''}{exc.message}") from None
    except TypeError as exc:
        raise ValueError(f"{where} must be {expected}; {exc}") from None


def to_json(value: Any) -> Any:
    """`value` as plain JSON data: tensors and numpy arrays as nested lists, numpy scalars as numbers, bytes
    as base64 text, pydantic models and dataclasses as objects, tuples as lists."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value  # NaN and infinities too: Python's json writes and reads them
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if _is_array(value):
        return value.tolist()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return to_json(value.item())
    if hasattr(value, "model_dump"):  # a pydantic model
        return to_json(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json(dataclasses.asdict(value))
    raise TypeError(f"a {type(value).__name__} cannot be sent as JSON")


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape") and \
        getattr(value, "ndim", 0) > 0
