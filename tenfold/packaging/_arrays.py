"""Numbers from JSON or Arrow as arrays of a tensor input's dtype and shape, refused with a ValueError that
names the input where they do not fit."""

from __future__ import annotations

from typing import Any

import numpy as np

from .manifest import TensorSpec


def numpy_dtype(spec: TensorSpec) -> np.dtype:
    try:
        return np.dtype(spec.dtype)
    except TypeError:
        raise ValueError(f"input {spec.name!r} has dtype {spec.dtype}, which cannot be sent as numbers; "
                         "pass a torch.Tensor through a Python handle") from None


def cast(value: np.ndarray, spec: TensorSpec, where: str, *, typed: bool = False) -> np.ndarray:
    """`value` as the spec's dtype. JSON numbers carry no width: any number of the right kind is taken
    (integers that fit, integers as floats). A typed (Arrow) column must convert safely."""
    target = numpy_dtype(spec)
    if value.dtype == target:
        return value
    if typed:
        if not np.can_cast(value.dtype, target, "safe"):
            raise ValueError(f"{where} has type {value.dtype}, which does not convert safely to {spec.dtype}; "
                             f"expected {spec.describe()}")
        return value.astype(target)
    kind, want = value.dtype.kind, target.kind
    ok = (
        (want == "f" and kind in "iuf")
        or (want in "iu" and kind in "iu")
        or (want == "c" and kind in "iufc")
        or (want == "b" and kind == "b")
    )
    if not ok:
        raise ValueError(f"{where} must be {spec.dtype}, got {describe_kind(value)}; expected {spec.describe()}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = value.astype(target)
    if want in "iu" and not np.array_equal(out, value):
        raise ValueError(f"{where} has values out of range for {spec.dtype}")
    return out


def describe_kind(value: np.ndarray) -> str:
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "c": "complex numbers",
            "U": "strings", "S": "bytes", "O": "mixed or ragged values"}.get(value.dtype.kind, str(value.dtype))


def check_shape(value: np.ndarray, spec: TensorSpec, where: str) -> None:
    shape = list(spec.shape)
    if value.ndim != len(shape) or any(d is not None and d != n for d, n in zip(shape, value.shape)):
        raise ValueError(f"{where} has shape {list(value.shape)}, expected {spec.describe()} (?: any size)")


def from_nested(item: Any, spec: TensorSpec, where: str) -> np.ndarray:
    """Nested lists of numbers as an array of the spec's dtype and shape."""
    try:
        value = np.asarray(item)
    except (ValueError, OverflowError) as exc:  # ragged nesting
        raise ValueError(f"{where} is not a rectangular array: {exc}") from None
    if value.dtype.kind in "OUSV":
        raise ValueError(f"{where} must be a rectangular array of numbers, got {describe_kind(value)}")
    if value.size == 0:  # `[]` carries no dtype: take the model's
        value = value.astype(numpy_dtype(spec))
    value = cast(value, spec, where)
    check_shape(value, spec, where)
    return value
