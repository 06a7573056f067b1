"""A model's signature: specs built from its example inputs and type hints when it is packaged, and inputs
checked (and converted) against them when it is called.

A tensor or numpy array gets a TensorSpec (dtype and shape); any other value a ValueSpec with a JSON Schema,
from the callable's type hint through pydantic where there is one, else inferred from the example.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

from . import _arrays, _values
from .manifest import Spec, Structure, TensorSpec, ValueSpec

# Hints that say nothing a JSON Schema could check: the example value decides.
_ARRAY_HINTS = {"Tensor", "torch.Tensor", "ndarray", "numpy.ndarray", "np.ndarray"}
_OPAQUE_HINTS = {"Any", "object", *_ARRAY_HINTS}


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def call_target(model: Any) -> Callable[..., Any]:
    """What a call of `model` runs: forward() of a torch module, else the object's __call__ (or itself)."""
    forward = getattr(model, "forward", None)
    if forward is not None and _is_module(model):
        return forward
    return model if inspect.isfunction(model) or inspect.ismethod(model) else model.__call__


def _is_module(model: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _parameters(model: Any) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(call_target(model)).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def input_names(model: Any, count: int) -> list[str]:
    """The call's positional parameter names, else input_<i>."""
    names = [p.name for p in _parameters(model)]
    return names[:count] if len(names) >= count else [f"input_{i}" for i in range(count)]


def hints(model: Any) -> dict[str, Any]:
    """The call's type hints (with Annotated metadata), or {} where they cannot be resolved."""
    try:
        return typing.get_type_hints(call_target(model), include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable hints are no hints: the examples decide
        return {}


_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len >="), ("max_length", "len <="))


def _hint_text(hint: Any) -> str:
    """A type hint as a reader writes it: 'list[str]', 'int | None', 'int (>= 1, <= 24)', 'list[Hit]'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        bounds = [f"{sign} {getattr(m, attr)}" for m in _metadata(args[1:]) for attr, sign in _BOUNDS
                  if getattr(m, attr, None) is not None]
        return _hint_text(args[0]) + (f" ({', '.join(bounds)})" if bounds else "")
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_hint_text(a) for a in args)
    if origin is not None and args:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _hint_text(a) for a in args)}]"
    if hint is type(None):
        return "None"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("typing_extensions.", "")


def _metadata(items: Sequence[Any]) -> list[Any]:
    """Annotated's metadata, with pydantic's Field(...) opened up into its constraints."""
    out: list[Any] = []
    for item in items:
        out.extend(getattr(item, "metadata", None) or [item])
    return out


def _json_hint(hint: Any) -> bool:
    return hint is not None and _hint_text(hint) not in _OPAQUE_HINTS and hint is not inspect.Parameter.empty


@functools.cache
def _adapter(hint: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(hint)


# -- at packaging ----------------------------------------------------------------------------------


def input_specs(model: Any, inputs: Sequence[Any], dynamic: Mapping[str, Sequence[int]] | None) -> list[Spec]:
    """One spec per positional input: its example value decides tensor or value, the hint gives the schema."""
    names = input_names(model, len(inputs))
    tensors = {n: v for n, v in zip(names, inputs) if _is_tensor(v) or _values._is_array(v)}
    dynamic = dict(dynamic) if dynamic is not None else {n: (0,) for n, v in tensors.items() if len(v.shape) > 0}
    unknown = sorted(set(dynamic) - set(tensors))
    if unknown:
        raise ValueError(f"dynamic names inputs that are not tensors or arrays {unknown}; the tensor inputs are "
                         f"{sorted(tensors)}")
    hinted = hints(model)
    specs: list[Spec] = []
    for name, value in zip(names, inputs):
        if name in tensors:
            specs.append(_tensor_spec(name, value, dynamic.get(name, ())))
            continue
        hint = hinted.get(name)
        if hint is not None and _hint_text(hint) in _ARRAY_HINTS:
            raise TypeError(f"input {name!r} is hinted {_hint_text(hint)}, but its example is a "
                            f"{type(value).__name__}; pass a {_hint_text(hint)} as its example")
        specs.append(_value_spec(name, value, hint))
    return specs


def _tensor_spec(name: str, value: Any, dynamic_dims: Sequence[int]) -> TensorSpec:
    rank = len(value.shape)
    bad = sorted(d for d in dynamic_dims if not 0 <= d < rank)
    if bad:
        raise ValueError(f"dynamic dims {bad} of input {name!r} are out of range for rank {rank}")
    shape = [None if i in set(dynamic_dims) else int(s) for i, s in enumerate(value.shape)]
    array: Literal["torch", "numpy"] = "torch" if _is_tensor(value) else "numpy"
    return TensorSpec(name=name, dtype=dtype_name(value.dtype), shape=shape, array=array)


def _value_spec(name: str, value: Any, hint: Any) -> ValueSpec:
    if _json_hint(hint):
        try:
            schema = _adapter(hint).json_schema()
        except Exception as exc:  # noqa: BLE001 - pydantic's own message says which part it cannot handle
            raise TypeError(f"{name}: the type hint {_hint_text(hint)} has no JSON Schema ({exc}); use types "
                            "pydantic understands (list[str], dict[str, float], Literal, pydantic models...)") from None
        return ValueSpec(name=name, type=_hint_text(hint), json_schema=schema, hinted=True)
    try:
        type_text, schema = _values.infer(value)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from None
    return ValueSpec(name=name, type=type_text, json_schema=schema, hinted=False)


def output_specs(model: Any, output: Any, inputs: list[Spec], values: Sequence[Any]) -> tuple[Structure, list[Spec]]:
    """(structure, specs) of the example output: tensors as before (a tensor, or a tuple, list or str-keyed
    dict of them), anything else one ValueSpec from the return hint or the example."""
    named = _tensor_outputs(output)
    if named is None:
        return "value", [_value_spec("output", output, hints(model).get("return"))]
    structure, tensors = named
    batch = bool(inputs) and isinstance(inputs[0], TensorSpec) and bool(inputs[0].shape) and inputs[0].shape[0] is None
    varying = {int(v.shape[d]) for spec, v in zip(inputs, values) if isinstance(spec, TensorSpec)
               for d, s in enumerate(spec.shape) if s is None and d > 0 and v.shape[d] > 1}
    specs: list[Spec] = [
        TensorSpec(name=name, dtype=dtype_name(t.dtype),
                   shape=[None if (i == 0 and batch) or (i > 0 and int(s) in varying) else int(s)
                          for i, s in enumerate(t.shape)])
        for name, t in tensors
    ]
    return structure, specs


def is_stream(output: Any) -> bool:
    """Whether a call's result is an iterator (a generator, say): its items are the answer, served as they come."""
    return isinstance(output, Iterator) and not _is_tensor(output)


def stream_specs(model: Any, items: Sequence[Any]) -> tuple[Structure, list[Spec]]:
    """("stream", [spec of one item]): from the return hint's item type (Iterator[X], Generator[X, ...],
    Iterable[X]) where there is one, else from the first item the example yielded."""
    if not items:
        raise ValueError("the model's iterator yielded nothing on example_inputs; give example inputs for which it "
                         "yields at least one item")
    hint = hints(model).get("return")
    origin = typing.get_origin(hint)
    item_hint = typing.get_args(hint)[0] if origin in _ITERATORS and typing.get_args(hint) else None
    if item_hint is None and (_is_tensor(items[0]) or _values._is_array(items[0])):
        raise TypeError("a streaming model yields Python values (str, numbers, lists, dicts, pydantic models...), "
                        f"not {type(items[0]).__name__}; yield item.tolist() instead")
    return "stream", [_value_spec("output", items[0], item_hint)]


_ITERATORS = {Iterator, Iterable, Generator, typing.Iterator, typing.Iterable, typing.Generator}


def _tensor_outputs(output: Any) -> tuple[Structure, list[tuple[str, Any]]] | None:
    if _is_tensor(output):
        return "tensor", [("output", output)]
    if type(output) in (tuple, list) and output and all(_is_tensor(t) for t in output):
        return "tuple" if type(output) is tuple else "list", [(f"output_{i}", t) for i, t in enumerate(output)]
    if isinstance(output, Mapping) and output and all(isinstance(k, str) and _is_tensor(v)
                                                      for k, v in output.items()):
        return "dict", list(output.items())
    return None


def flatten_output(output: Any) -> tuple[Structure, list[tuple[str, Any]]]:
    """(structure, [(name, value), ...]): tensors by name, or the whole value as 'output'."""
    return _tensor_outputs(output) or ("value", [("output", output)])


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype") and hasattr(value, "shape") and \
        hasattr(value, "detach")


# -- at call time ----------------------------------------------------------------------------------


def check_inputs(specs: Sequence[Spec], inputs: Sequence[Any], signature: str) -> None:
    """Raise ValueError naming the first input that surely does not fit `specs`: the count, and the dtype,
    rank and sizes of tensors and arrays. What needs the model's code (type hints) is checked where it runs."""
    if len(inputs) != len(specs):
        raise ValueError(f"expected {len(specs)} input(s), got {len(inputs)}; the model's signature is {signature}")
    for i, (spec, value) in enumerate(zip(specs, inputs)):
        if isinstance(spec, TensorSpec) and (_is_tensor(value) or _values._is_array(value)):
            _check_dtype_and_shape(spec, value, f"input {i} ({spec.name!r})", signature)


def _check_tensor(spec: TensorSpec, t: Any, where: str, signature: str) -> None:
    kind = "torch.Tensor" if spec.array == "torch" else "numpy.ndarray"
    if not (_is_tensor(t) if spec.array == "torch" else _values._is_array(t) or type(t).__name__ == "ndarray"):
        raise ValueError(f"{where} must be a {kind}, not {type(t).__name__}; expected {spec.describe()}")
    _check_dtype_and_shape(spec, t, where, signature)


def _check_dtype_and_shape(spec: TensorSpec, t: Any, where: str, signature: str) -> None:
    if dtype_name(t.dtype) != spec.dtype:
        raise ValueError(f"{where} has dtype {dtype_name(t.dtype)}, expected {spec.describe()} in {signature}")
    if len(t.shape) != spec.rank:
        raise ValueError(f"{where} has rank {len(t.shape)} (shape {list(t.shape)}), expected {spec.describe()}")
    for d, (want, got) in enumerate(zip(spec.shape, t.shape)):
        if want is not None and want != got:
            raise ValueError(f"{where} has size {got} in dim {d} (shape {list(t.shape)}), expected {spec.describe()}")


def prepare_inputs(model: Any, specs: Sequence[Spec], inputs: Sequence[Any], signature: str, *,
                   from_json: bool = False) -> list[Any]:
    """`inputs` checked against `specs` and converted for the call, inside the interpreter that runs it.

    A tensor input may come as a tensor (checked), a numpy array (seen as a tensor, no copy) or nested
    lists (converted to the spec's dtype); a value input is validated by its type hint through pydantic
    (which may convert it, e.g. a dict into a pydantic model) or against its inferred schema. Inputs
    `from_json` (an HTTP body) are first held to the JSON Schema the OpenAPI document publishes, so that
    what it rejects is refused (pydantic's lax mode would take 0 for a bool). A value that does not fit
    raises ValueError naming the input and what was expected.
    """
    if len(inputs) != len(specs):
        raise ValueError(f"expected {len(specs)} input(s), got {len(inputs)}; the model's signature is {signature}")
    hinted = None
    out = []
    for i, (spec, value) in enumerate(zip(specs, inputs)):
        where = f"input {i} ({spec.name!r})"
        if isinstance(spec, TensorSpec):
            value = _as_array(spec, value, where)
            _check_tensor(spec, value, where, signature)
        elif spec.hinted:
            hinted = hints(model) if hinted is None else hinted
            raw = value
            value = _validate_hinted(hinted.get(spec.name), spec, value, where)
            if from_json and spec.json_schema:  # what pydantic's lax mode took, the published schema must allow
                _values.validate(spec.json_schema, raw, where, spec.type)
        else:
            _values.validate(spec.json_schema, value, where, spec.type)
        out.append(value)
    return out


def _validate_hinted(hint: Any, spec: ValueSpec, value: Any, where: str) -> Any:
    if hint is None:  # the hint no longer resolves where the model runs: check the recorded schema
        _values.validate(spec.json_schema, value, where, spec.type)
        return value
    from pydantic import ValidationError

    try:
        return _adapter(hint).validate_python(_plain(value))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'at ' + ''.join(f'[{p!r}]' for p in e['loc']) + ': ' if e['loc'] else ''}{e['msg']}"
            for e in exc.errors(include_url=False)[:3]
        )
        raise ValueError(f"{where} must be {spec.type}; {problems}") from None


def _plain(value: Any) -> Any:
    """`value` with the pydantic models in it as dicts: a model made by the caller's copy of a class is not
    an instance of the interpreter's copy (the archive's), but its fields validate into one."""
    if hasattr(value, "model_dump") and not isinstance(value, type):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _as_array(spec: TensorSpec, value: Any, where: str) -> Any:
    """A tensor input as the array type the model takes: numpy arrays and nested lists converted."""
    if spec.array == "torch" and _is_tensor(value):
        return value
    import numpy as np

    if isinstance(value, (list, tuple, int, float, bool)):
        value = _arrays.from_nested(value, spec, where)
    if spec.array == "numpy" or not isinstance(value, np.ndarray):
        return value
    import torch

    if not value.flags.writeable:  # a shared, read-only view: the model must not write into it
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(value)
    return torch.from_numpy(value)
