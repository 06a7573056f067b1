"""The wire format of the HTTP endpoint: JSON and Arrow IPC in and out, and errors as JSON bodies.

JSON: `{"inputs": [x0, x1, ...]}`, one nested list per positional input of the model, converted to the
manifest's dtypes; the answer is `{"outputs": [y0, ...]}`, one nested list per output.
Arrow IPC stream: one column per input, named as in the manifest, rows along the first dimension
(1-D inputs as plain columns, higher ranks as `fixed_shape_tensor` columns); the answer is a stream
with one column per output, encoded the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

JSON_TYPE = "application/json"
ARROW_TYPE = "application/vnd.apache.arrow.stream"


class HTTPError(Exception):
    """An answer other than 200: `status`, a short `kind` and a message for the caller."""

    status = 500
    kind = "InternalError"

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind
        self.headers = headers or {}

    def body(self) -> bytes:
        return json.dumps({"error": {"status": self.status, "type": self.kind, "message": self.message}}).encode()


class MalformedRequest(HTTPError):
    """The body cannot be parsed at all (400)."""

    status = 400
    kind = "MalformedRequest"


class InvalidInput(HTTPError):
    """The body parses but does not match the model's signature (422)."""

    status = 422
    kind = "InvalidInput"


class PayloadTooLarge(HTTPError):
    status = 413
    kind = "PayloadTooLarge"


class UnsupportedMediaType(HTTPError):
    status = 415
    kind = "UnsupportedMediaType"


def _describe(spec: Any) -> str:
    dims = ", ".join("?" if d is None else str(d) for d in spec.shape)
    return f"{spec.name}: {spec.dtype}[{dims}]"


def _signature(specs: Sequence[Any]) -> str:
    return "(" + ", ".join(_describe(s) for s in specs) + ")"


def _numpy_dtype(spec: Any) -> np.dtype:
    try:
        return np.dtype(spec.dtype)
    except TypeError:
        raise InvalidInput(f"input {spec.name!r} has dtype {spec.dtype}, which HTTP callers cannot send; "
                           "use a Python handle") from None


def _cast(value: np.ndarray, spec: Any, where: str, *, typed: bool = False) -> np.ndarray:
    """`value` as the spec's dtype, else 422. JSON numbers carry no width: any number of the right kind
    is taken (integers that fit, integers as floats). A typed (Arrow) column must convert safely."""
    target = _numpy_dtype(spec)
    if value.dtype == target:
        return value
    if typed:
        if not np.can_cast(value.dtype, target, "safe"):
            raise InvalidInput(f"{where} has type {value.dtype}, which does not convert safely to {spec.dtype}; "
                               f"expected {_describe(spec)}")
        return value.astype(target)
    kind, want = value.dtype.kind, target.kind
    ok = (
        (want == "f" and kind in "iuf")
        or (want in "iu" and kind in "iu")
        or (want == "c" and kind in "iufc")
        or (want == "b" and kind == "b")
    )
    if not ok:
        raise InvalidInput(f"{where} must be {spec.dtype}, got {_describe_kind(value)}; expected {_describe(spec)}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = value.astype(target)
    if want in "iu" and not np.array_equal(out, value):
        raise InvalidInput(f"{where} has values out of range for {spec.dtype}")
    return out


def _describe_kind(value: np.ndarray) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "c": "complex numbers",
            "U": "strings", "S": "bytes", "O": "mixed or ragged values"}.get(value.dtype.kind, str(value.dtype))


def _check_shape(value: np.ndarray, spec: Any, where: str) -> None:
    shape = list(spec.shape)
    if value.ndim != len(shape) or any(d is not None and d != n for d, n in zip(shape, value.shape)):
        raise InvalidInput(f"{where} has shape {list(value.shape)}, expected {_describe(spec)} (?: any size)")


def decode_json(body: bytes, specs: Sequence[Any]) -> list[np.ndarray]:
    """Arrays from `{"inputs": [...]}`, converted to and checked against the manifest's inputs."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise MalformedRequest("the body's JSON is nested too deeply to parse") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f'the body must be a JSON object {{"inputs": [...]}}, got {type(doc).__name__}')
    unknown = sorted(set(doc) - {"inputs"})
    if unknown or "inputs" not in doc:
        raise InvalidInput(f'the body must have exactly the key "inputs", got {sorted(doc)}')
    items = doc["inputs"]
    if isinstance(items, dict):  # by name, for callers who prefer it
        missing = [s.name for s in specs if s.name not in items]
        extra = sorted(set(items) - {s.name for s in specs})
        if missing or extra:
            raise InvalidInput(f"inputs by name must be exactly {[s.name for s in specs]}; "
                               f"missing {missing}, unexpected {extra}")
        items = [items[s.name] for s in specs]
    if not isinstance(items, list):
        raise InvalidInput(f'"inputs" must be a list with one entry per model input, got {type(items).__name__}')
    if len(items) != len(specs):
        raise InvalidInput(f"the model takes {len(specs)} input(s) {_signature(specs)}, got {len(items)}")
    arrays = []
    for i, (item, spec) in enumerate(zip(items, specs)):
        where = f"input {i} ({spec.name})"
        try:
            value = np.asarray(item)
        except (ValueError, OverflowError) as exc:  # ragged nesting
            raise InvalidInput(f"{where} is not a rectangular array: {exc}") from None
        if value.dtype.kind in "OUSV":
            raise InvalidInput(f"{where} must be a rectangular array of numbers, got {_describe_kind(value)}")
        if value.size == 0:  # `[]` carries no dtype: take the model's
            value = value.astype(_numpy_dtype(spec))
        value = _cast(value, spec, where)
        _check_shape(value, spec, where)
        arrays.append(value)
    return arrays


def encode_json(outputs: Sequence[np.ndarray]) -> bytes:
    return json.dumps({"outputs": [np.asarray(o).tolist() for o in outputs]}).encode()


def predict_json(model: Any, body: bytes, specs: Sequence[Any], names: Sequence[str]) -> bytes:
    """The JSON answer of `model` to a JSON request body: decoding, the call and encoding in one step, so
    that an interpreter does them all and the replica's host thread only moves bytes."""
    import torch

    inputs = [torch.from_numpy(a) for a in decode_json(body, specs)]
    return encode_json(as_arrays(model(*inputs), names))


def as_arrays(result: Any, names: Sequence[str]) -> list[np.ndarray]:
    """A model's output (a tensor, or a tuple/list/dict of them) as one numpy array per manifest output."""
    if isinstance(result, dict):
        values = [result[n] for n in names] if set(names) <= set(result) else list(result.values())
    elif isinstance(result, list | tuple):
        values = list(result)
    else:
        values = [result]
    if len(values) != len(names):
        raise ValueError(f"the model returned {len(values)} output(s), its manifest names {len(names)}: {list(names)}")
    out = []
    for v in values:
        if hasattr(v, "detach"):  # a torch tensor
            v = v.detach().cpu().numpy()
        out.append(np.asarray(v))
    return out


def decode_arrow(body: bytes, specs: Sequence[Any]) -> list[np.ndarray]:
    """Arrays from an Arrow IPC stream with one column per input (seen in place where the type allows)."""
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise MalformedRequest(f"the body is not an Arrow IPC stream: {exc}") from None
    names = [s.name for s in specs]
    if table.column_names != names:
        raise InvalidInput(f"the Arrow columns must be {names} (one per model input {_signature(specs)}), "
                           f"got {table.column_names}")
    arrays = []
    for name, spec in zip(names, specs):
        column = table.column(name).combine_chunks()
        where = f"column {name!r}"
        if column.null_count:
            raise InvalidInput(f"{where} has {column.null_count} null value(s)")
        numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
        if isinstance(column.type, pa.FixedShapeTensorType):
            try:
                value = column.to_numpy_ndarray()
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise InvalidInput(f"{where} is a tensor column numpy cannot take ({exc}); send a numeric "
                                   "fixed_shape_tensor column") from None
        elif numeric or pa.types.is_boolean(column.type):
            value = column.to_numpy(zero_copy_only=False)
        else:
            raise InvalidInput(f"{where} has Arrow type {column.type}; send a numeric column (1-D input) or a "
                               "fixed_shape_tensor column (rows along the first dimension)")
        value = _cast(value, spec, where, typed=True)
        _check_shape(value, spec, where)
        arrays.append(value)
    return arrays


def encode_arrow(outputs: Sequence[np.ndarray], names: Sequence[str]) -> bytes:
    """An Arrow IPC stream with one column per output; outputs must share their first dimension."""
    import pyarrow as pa

    columns = []
    for value in outputs:
        value = np.ascontiguousarray(value)
        if value.ndim == 0:
            value = value.reshape(1)
        if value.ndim == 1:
            columns.append(pa.array(value))
        else:
            columns.append(_tensor_column(value))
    lengths = {len(c) for c in columns}
    if len(lengths) > 1:
        raise HTTPError(f"the outputs {list(names)} have different first dimensions {[len(c) for c in columns]}, "
                        "which one Arrow table cannot hold; ask for JSON")
    table = pa.table(columns, names=list(names))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _tensor_column(value: np.ndarray) -> Any:
    """A fixed_shape_tensor column with rows along dimension 0 (from_numpy_ndarray refuses zero rows)."""
    import pyarrow as pa

    if len(value):
        return pa.FixedShapeTensorArray.from_numpy_ndarray(value)
    tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(value.dtype), list(value.shape[1:]))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), int(np.prod(value.shape[1:])))
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def example_request(source: Any) -> dict[str, Any]:
    """A JSON request body (as a dict) for the archive at `source`: the first row of every example input
    stored in it at packaging."""
    from tenfold.packaging import read_example_inputs

    return {"inputs": [_first_row(v).tolist() for v in read_example_inputs(source)]}


def example_arrow_request(source: Any) -> bytes | None:
    """An Arrow request body for the same inputs as `example_request`."""
    from tenfold.packaging import read_example_inputs, read_manifest

    names = [s.name for s in read_manifest(source).inputs]
    return encode_arrow_inputs([_first_row(v) for v in read_example_inputs(source)], names)


def _first_row(value: Any) -> np.ndarray:
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    return array[:1] if array.ndim else array


def decode_arrow_outputs(body: bytes) -> dict[str, np.ndarray]:
    """Client side: the arrays of an Arrow answer, by output name."""
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        out[name] = (column.to_numpy_ndarray() if isinstance(column.type, pa.FixedShapeTensorType)
                     else column.to_numpy(zero_copy_only=False))
    return out


def encode_arrow_inputs(inputs: Sequence[np.ndarray], names: Sequence[str]) -> bytes:
    """Client side: an Arrow request body for `inputs` (they share their first dimension)."""
    return encode_arrow(inputs, names)
