"""The manifest stored as manifest.json in every archive tenfold writes: interface, provenance, digests."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

MANIFEST_RECORD = "manifest.json"
FORMAT_VERSION = 2


class TensorSpec(BaseModel):
    """One input or output tensor: its name, dtype and shape (None marks a dynamic dimension)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["tensor"] = "tensor"
    name: str = Field(description="parameter name for inputs; output_<i> or the dict key for outputs")
    dtype: str = Field(description='torch dtype without the "torch." prefix, e.g. "float32", "int64"')
    shape: list[int | None] = Field(description="size of each dimension; None where any size is accepted")
    array: Literal["torch", "numpy"] = Field("torch", description="the array type the model takes or returns")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def describe(self) -> str:
        """'tokens: int64[?, 16]'"""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


class ValueSpec(BaseModel):
    """One input or output that is a Python value (str, numbers, lists, dicts, bytes, pydantic models...),
    described by a JSON Schema: from the callable's type hints where it has them, else from the example."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["value"] = "value"
    name: str = Field(description="parameter name for inputs; 'output' for the output")
    type: str = Field(description="the Python type, as written in the hint or inferred, e.g. 'list[str]'")
    json_schema: dict[str, Any] = Field(description="JSON Schema (2020-12) of the value as JSON")
    hinted: bool = Field(description="True if taken from a type hint (then the hint validates it), else inferred")

    def describe(self) -> str:
        """'texts: list[str]'"""
        return f"{self.name}: {self.type}"


Spec = TensorSpec | ValueSpec
Structure = Literal["tensor", "tuple", "list", "dict", "value", "stream"]


class ReferenceCheck(BaseModel):
    """Where the example inputs and the output recorded at packaging are kept, and how close a re-run must be."""

    resource: str = Field(description="archive record holding torch.save({'inputs': ..., 'output': ...})")
    rtol: float = Field(ge=0, description="relative tolerance of the re-run at load(verify=True)")
    atol: float = Field(ge=0, description="absolute tolerance of the re-run at load(verify=True)")


class Manifest(BaseModel):
    """What tenfold records about a packaged model (manifest.json inside the archive)."""

    format_version: int = FORMAT_VERSION
    name: str = Field(description="model name")
    entry: str = Field(description='archive resource holding the pickled model, e.g. "model/model.pkl"')
    inputs: list[Spec] = Field(description="positional inputs of the model's call, in order")
    outputs: list[Spec] = Field(description="output tensors, flattened in order; or one value; or, for a stream, "
                                            "one item")
    output_structure: Structure = Field(
        description="how the outputs are arranged: one tensor, a tuple, a list or a dict of tensors, any value, "
        "or a stream (the call returns an iterator, and each item it yields is one value)"
    )
    torch_version: str
    python_version: str
    interned_modules: list[str] = Field(default_factory=list, description="modules whose source is in the archive")
    extern_modules: list[str] = Field(default_factory=list, description="modules the loading side must provide")
    requirements: list[str] = Field(
        default_factory=list,
        description="installed distributions the extern modules came from, as NAME==VERSION at packaging",
    )
    mocked_modules: list[str] = Field(default_factory=list)
    weight_bytes: NonNegativeInt = Field(description="bytes of tensor storage in the archive (the model's weights)")
    tensor_count: NonNegativeInt = Field(description="number of tensor storages in the archive")
    reference: ReferenceCheck | None = None
    writes_weights: list[str] = Field(
        default_factory=list,
        description="parameters and buffers the model changed when it ran at packaging; such a model needs "
        "copy_weights=True, since shared weights are read-only",
    )
    record_sha256: dict[str, str] = Field(description="sha256 of every record of the archive but manifest.json")
    content_sha256: str = Field(description="sha256 of this manifest without this field (covers every record)")

    @property
    def takes_values(self) -> bool:
        """True if any input or the output is a Python value rather than tensors."""
        return self.output_structure in ("value", "stream") or any(isinstance(s, ValueSpec) for s in self.inputs)

    @property
    def streams(self) -> bool:
        """True if the call returns an iterator whose items are served as they are produced."""
        return self.output_structure == "stream"

    def signature(self) -> str:
        """'(tokens: int64[?, ?]) -> (output: float32[?, 12])', or '(texts: list[str]) -> list[list[float]]'"""
        ins = ", ".join(s.describe() for s in self.inputs)
        if self.output_structure in ("value", "stream"):
            out = self.outputs[0].type if isinstance(self.outputs[0], ValueSpec) else "?"
            return f"({ins}) -> {f'Iterator[{out}]' if self.streams else out}"
        outs = ", ".join(s.describe() for s in self.outputs)
        return f"({ins}) -> ({outs})"


def content_digest(manifest: Manifest | dict[str, Any]) -> str:
    """The digest stored in `content_sha256`: sha256 of the canonical JSON of every other field.

    Checking takes the manifest as written (a dict parsed from manifest.json), not as this version of the
    Manifest model reads it: fields a later version added, with their defaults, are not in an older
    archive's digest."""
    data = dict(manifest) if isinstance(manifest, dict) else manifest.model_dump(mode="json")
    data.pop("content_sha256", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()
