"""The wire format of the HTTP endpoint: JSON and Arrow IPC in and out, and errors as JSON bodies.

JSON: `{"inputs": [x0, x1, ...]}` (positional) or `{"inputs": {"name": x, ...}}` (by parameter name).
A tensor input is nested lists of numbers, converted to the manifest's dtype; a Python-valued input is
any JSON value, validated against the manifest's signature. A tensor model answers `{"outputs": [y0, ...]}`,
one nested list per output; a Python-valued model answers `{"outputs": <its result as JSON>}`.
Arrow IPC stream (tensor models): one column per input, named as in the manifest, rows along the first
dimension (1-D inputs as plain columns, higher ranks as `fixed_shape_tensor` columns); the answer is a
stream with one column per output, encoded the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tenfold.packaging import Manifest, Spec, TensorSpec, ValueSpec, _arrays, _signature, _values

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

    def __reduce__(self) -> tuple[Any, ...]:  # crosses back from interpreters with its status
        return (_rebuild_http_error, (type(self), self.message, self.status, self.kind, self.headers))

    def body(self) -> bytes:
        return json.dumps({"error": {"status": self.status, "type": self.kind, "message": self.message}}).encode()


def _rebuild_http_error(cls: type[HTTPError], message: str, status: int, kind: str,
                        headers: dict[str, str]) -> HTTPError:
    return cls(message, status=status, kind=kind, headers=headers)


class MalformedRequest(HTTPError):
    """The body cannot be parsed at all (400)."""

    status = 400
    kind = "MalformedRequest"


class InvalidInput(HTTPError, ValueError):
    """The inputs do not match the model's signature: a 422 over HTTP, a ValueError through a handle."""

    status = 422
    kind = "InvalidInput"


class ModelNotFound(HTTPError, LookupError):
    """A request names a model the application does not serve (404; a LookupError through a handle)."""

    status = 404
    kind = "ModelNotFound"


class PayloadTooLarge(HTTPError):
    status = 413
    kind = "PayloadTooLarge"


class UnsupportedMediaType(HTTPError):
    status = 415
    kind = "UnsupportedMediaType"


@dataclass(frozen=True)
class Interface:
    """What the codec needs of a manifest, small enough to travel with every request to an interpreter."""

    inputs: tuple[Spec, ...]
    outputs: tuple[str, ...]
    structure: str
    signature: str

    @classmethod
    def of(cls, manifest: Manifest) -> Interface:
        return cls(tuple(manifest.inputs), tuple(o.name for o in manifest.outputs), manifest.output_structure,
                   manifest.signature())

    @property
    def takes_values(self) -> bool:
        """True for a Python-valued model (any input or the output is not a tensor)."""
        return self.structure in ("value", "stream") or not all(isinstance(s, TensorSpec) for s in self.inputs)

    @property
    def streams(self) -> bool:
        """True for a model whose call returns an iterator: its items are sent as they are produced."""
        return self.structure == "stream"


def batches_values(manifest: Manifest) -> bool:
    """Whether a Python-valued model takes a batch: one list in, a list out (of the same length, one result per
    item), as `(texts: list[str]) -> list[list[float]]`. Requests to it can be joined into one call."""
    def is_list(specs: Sequence[Spec]) -> bool:
        return len(specs) == 1 and isinstance(specs[0], ValueSpec) and specs[0].json_schema.get("type") == "array"

    return manifest.takes_values and is_list(manifest.inputs) and is_list(manifest.outputs)


def _signature_of(specs: Sequence[Any]) -> str:
    return "(" + ", ".join(s.describe() for s in specs) + ")"


def parse_inputs(body: bytes, specs: Sequence[Spec]) -> list[Any]:
    """The positional inputs of `{"inputs": [...]}` or `{"inputs": {name: ...}}`, as JSON values."""
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
        raise InvalidInput(f"the model takes {len(specs)} input(s) {_signature_of(specs)}, got {len(items)}")
    return items


def decode_json(body: bytes, specs: Sequence[Spec]) -> list[np.ndarray]:
    """Arrays from `{"inputs": [...]}` for a tensor model, converted to and checked against its inputs."""
    arrays = []
    for i, (item, spec) in enumerate(zip(parse_inputs(body, specs), specs)):
        if not isinstance(spec, TensorSpec):
            raise InvalidInput(f"input {i} ({spec.name}) is a Python value; decode it with parse_inputs")
        try:
            arrays.append(_arrays.from_nested(item, spec, f"input {i} ({spec.name})"))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
    return arrays


def encode_json(outputs: Sequence[np.ndarray]) -> bytes:
    return json.dumps({"outputs": [np.asarray(o).tolist() for o in outputs]}).encode()


def encode_value(result: Any) -> bytes:
    """The JSON answer of a Python-valued model: `{"outputs": <result as JSON>}`."""
    try:
        return json.dumps({"outputs": _values.to_json(result)}).encode()
    except TypeError as exc:
        raise HTTPError(f"the model's result cannot be sent as JSON: {exc}", status=500,
                        kind="ModelError") from None


def predict_json(model: Any, body: bytes, interface: Interface) -> bytes:
    """The JSON answer of `model` to a JSON request body: decoding, validation, the call and encoding in one
    step, so that an interpreter does them all and the replica's host thread only moves bytes."""
    if interface.takes_values:
        try:
            inputs = _signature.prepare_inputs(model, interface.inputs, parse_inputs(body, interface.inputs),
                                               interface.signature, from_json=True)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return encode_value(model(*inputs))
    import torch

    tensors = [torch.from_numpy(a) for a in decode_json(body, interface.inputs)]
    return encode_json(as_arrays(model(*tensors), interface.outputs))


def open_json(model: Any, body: bytes, interface: Interface) -> Any:
    """The iterator of a streaming model on a JSON request body, decoded and validated as `predict_json` does,
    inside the interpreter that will hold it."""
    try:
        inputs = _signature.prepare_inputs(model, interface.inputs, parse_inputs(body, interface.inputs),
                                           interface.signature, from_json=True)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return model(*inputs)


#: A stream's media types: newline-delimited JSON (the default), or server-sent events on request.
NDJSON_TYPE = "application/x-ndjson"
EVENT_STREAM_TYPE = "text/event-stream"


def _item_json(item: Any) -> bytes:
    try:
        return json.dumps(_values.to_json(item)).encode()
    except TypeError as exc:
        raise HTTPError(f"an item the model yielded cannot be sent as JSON: {exc}", status=500,
                        kind="ModelError") from None


def encode_line(item: Any) -> bytes:
    """One item of a stream as a line of newline-delimited JSON."""
    return _item_json(item) + b"\n"


def encode_event(item: Any) -> bytes:
    """One item of a stream as a server-sent event: `data: <item as JSON>`."""
    return b"data: " + _item_json(item) + b"\n\n"


def stream_error(error: HTTPError, events: bool) -> bytes:
    """The last chunk of a stream that failed after its first item (the status was sent already): the error's
    JSON body as a last line `{"error": {...}}`, or as an `event: error`."""
    return b"event: error\ndata: " + error.body() + b"\n\n" if events else error.body() + b"\n"


def predict_arrow(model: Any, body: bytes, interface: Interface) -> bytes:
    """The Arrow answer of a tensor model to an Arrow request body, all of it inside an interpreter."""
    import torch

    if interface.takes_values:
        raise UnsupportedMediaType(f"this model takes Python values {interface.signature}: send {JSON_TYPE}")
    tensors = [torch.from_numpy(a) for a in decode_arrow(body, interface.inputs)]
    return encode_arrow(as_arrays(model(*tensors), interface.outputs), interface.outputs)


def run_arrays(model: Any, names: Sequence[str], *arrays: np.ndarray) -> list[np.ndarray]:
    """A tensor model run on numpy arrays (seen as tensors), its outputs as numpy arrays: what a batch of
    requests joined in the host sends to an interpreter, so that no tensor crosses back."""
    import torch

    return as_arrays(model(*[torch.from_numpy(a) for a in arrays]), names)


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
        raise InvalidInput(f"the Arrow columns must be {names} (one per model input {_signature_of(specs)}), "
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
        try:
            value = _arrays.cast(value, spec, where, typed=True)
            _arrays.check_shape(value, spec, where)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
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
    """A JSON request body (as a dict) for the archive at `source`, from the example inputs stored in it at
    packaging: the first row of each tensor input, the others as they are."""
    from tenfold.packaging import read_example_inputs, read_manifest

    specs = read_manifest(source).inputs
    values = read_example_inputs(source)
    return {"inputs": [_first_row(v).tolist() if isinstance(spec, TensorSpec) else _values.to_json(v)
                       for spec, v in zip(specs, values)]}


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
