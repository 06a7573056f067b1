"""Input and output signatures: specs from example tensors, and checking inputs against them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from .manifest import TensorSpec


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def input_names(model: Any, count: int) -> list[str]:
    """forward()'s positional parameter names, else input_<i>."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < count:
        return [f"input_{i}" for i in range(count)]
    return names[:count]


def input_specs(
    names: list[str], tensors: Sequence[Any], dynamic: Mapping[str, Sequence[int]] | None
) -> list[TensorSpec]:
    dynamic = dict(dynamic) if dynamic is not None else {n: (0,) for n, t in zip(names, tensors) if t.dim() > 0}
    unknown = sorted(set(dynamic) - set(names))
    if unknown:
        raise ValueError(f"dynamic names unknown inputs {unknown}; the inputs are {names}")
    specs = []
    for name, t in zip(names, tensors):
        dims = set(dynamic.get(name, ()))
        bad = sorted(d for d in dims if not 0 <= d < t.dim())
        if bad:
            raise ValueError(f"dynamic dims {bad} of input {name!r} are out of range for rank {t.dim()}")
        shape = [None if i in dims else int(s) for i, s in enumerate(t.shape)]
        specs.append(TensorSpec(name=name, dtype=dtype_name(t.dtype), shape=shape))
    return specs


def flatten_output(output: Any) -> tuple[str, list[tuple[str, Any]]]:
    """(structure, [(name, tensor), ...]) of a model's output; raises TypeError for other outputs."""
    import torch

    if isinstance(output, torch.Tensor):
        return "tensor", [("output", output)]
    if isinstance(output, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in output):
        return type(output).__name__ if type(output) in (tuple, list) else "tuple", [
            (f"output_{i}", t) for i, t in enumerate(output)
        ]
    if isinstance(output, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in output.items()):
        return "dict", list(output.items())
    raise TypeError(
        f"the model returned {type(output).__name__}; outputs must be a tensor, or a tuple, list or str-keyed dict "
        "of tensors"
    )


def output_specs(named: list[tuple[str, Any]], inputs: list[TensorSpec], tensors: Sequence[Any]) -> list[TensorSpec]:
    """Output specs, informative only: dim 0 is dynamic with a dynamic batch, and a later dim is taken as
    dynamic when its size is that of a dynamic input dimension (e.g. the sequence length)."""
    batch = bool(inputs) and bool(inputs[0].shape) and inputs[0].shape[0] is None
    varying = {int(t.shape[d]) for spec, t in zip(inputs, tensors) for d, s in enumerate(spec.shape)
               if s is None and d > 0 and t.shape[d] > 1}
    return [
        TensorSpec(
            name=name,
            dtype=dtype_name(t.dtype),
            shape=[None if (i == 0 and batch) or (i > 0 and int(s) in varying) else int(s)
                   for i, s in enumerate(t.shape)],
        )
        for name, t in named
    ]


def check_inputs(specs: list[TensorSpec], inputs: Sequence[Any], signature: str) -> None:
    """Raise ValueError naming the first input that does not fit `specs` (count, type, dtype, rank, size)."""
    import torch

    if len(inputs) != len(specs):
        raise ValueError(f"expected {len(specs)} input(s), got {len(inputs)}; the model's signature is {signature}")
    for i, (spec, t) in enumerate(zip(specs, inputs)):
        where = f"input {i} ({spec.name!r})"
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where} must be a torch.Tensor, not {type(t).__name__}; expected {spec.describe()}")
        if dtype_name(t.dtype) != spec.dtype:
            raise ValueError(f"{where} has dtype {dtype_name(t.dtype)}, expected {spec.describe()} in {signature}")
        if t.dim() != spec.rank:
            raise ValueError(f"{where} has rank {t.dim()} (shape {list(t.shape)}), expected {spec.describe()}")
        for d, (want, got) in enumerate(zip(spec.shape, t.shape)):
            if want is not None and want != got:
                raise ValueError(
                    f"{where} has size {got} in dim {d} (shape {list(t.shape)}), expected {spec.describe()}"
                )
