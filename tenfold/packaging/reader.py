"""Loading archives: validation, and the model rebuilt with its weights as views into the source.

Shared weights are read-only, enforced in three layers:

1. Before anything is shared: `save` runs the model once and records in the manifest any weight the
   run changed (compared byte for byte, whatever alias wrote it); `load` refuses such an archive with
   SharedWeightWrite unless `copy_weights=True`.
2. At inference, from a buffer source: weights are loaded as torch *inference tensors* and every call
   of the model runs with inference mode off, so an in-place op on a weight (`w.add_()`, `w[0] = ...`,
   `out=w`, `w.copy_()`) raises. torch checks after the kernel ran, so the bytes may already have
   changed: `replicate` turns the error into SharedWeightWrite and refuses every later call of that
   model in every interpreter.
3. A path source is mapped read-only: any write into a weight, through any alias (`w.data`,
   `w.detach()`, `w.numpy()` included), faults and stops the process before it can change what other
   interpreters see. Layer 1 keeps models known to write away from this.

`copy_weights=True` gives private, writable copies instead (one copy per load).
"""

from __future__ import annotations

import inspect
import io
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from . import _signature, _values
from .archive import Archive, Source, _BufferFile, open_archive
from .errors import PackageError, ReferenceMismatch

_INFERENCE_WRITE = "Inplace update to inference tensor outside InferenceMode"
SHARED_WRITE_HINT = (
    "tenfold: this model wrote into one of its weights during inference. Weights loaded by tenfold are "
    "shared by every interpreter and read-only; load with copy_weights=True to give this model a private, "
    "writable copy."
)


def is_shared_write(exc: BaseException) -> bool:
    """True if `exc` is torch refusing an in-place write into a shared (inference) weight."""
    return isinstance(exc, RuntimeError) and _INFERENCE_WRITE in str(exc)


def load(
    source: Source,
    *,
    sha256: str | None = None,
    verify: bool = False,
    resource: str | None = None,
    copy_weights: bool = False,
    strict_requirements: bool = False,
) -> Any:
    """Load the model of an archive (the object that was saved: a torch module or any callable), in eval
    mode, with its weights as views into `source` (no copy).

    `source` is a path (memory-mapped read-only) or a bytes-like buffer (used in place: keep it alive and
    unchanged while the model lives). `sha256` pins the archive's bytes. `verify=True` also checks every
    record against the manifest's digests and re-runs the model on the stored example inputs.
    `resource` loads a plain torch.package archive (no manifest) from that pickle, e.g. "model/model.pkl".
    `copy_weights=True` copies the weights into private, writable memory. A distribution the archive
    requires that is missing raises ExternMissing; one of another version warns (RequirementWarning), or
    raises RequirementMismatch with `strict_requirements=True`.
    """
    return load_archive(open_archive(source), sha256=sha256, verify=verify, resource=resource,
                        copy_weights=copy_weights, strict_requirements=strict_requirements)


def load_archive(
    archive: Archive,
    *,
    sha256: str | None = None,
    verify: bool = False,
    resource: str | None = None,
    copy_weights: bool = False,
    strict_requirements: bool = False,
) -> Any:
    """`load` for an archive already opened."""
    if resource is not None and not archive.has_manifest:  # a plain torch.package archive
        archive.check_pin(sha256)
        archive.check_entry(resource)
        archive.check_externs()
        return unpickle(archive, resource, copy_weights)
    if verify:
        archive.check_pin(sha256)
        archive.check_digests()
    manifest = archive.check_loadable(sha256=None if verify else sha256, copy_weights=copy_weights,
                                      strict_requirements=strict_requirements)
    entry = resource if resource is not None else manifest.entry
    archive.check_entry(entry)
    model = unpickle(archive, entry, copy_weights)
    if verify and manifest.reference is not None:
        check_reference(archive, model)
    return model


def read_example_inputs(source: Source) -> tuple[Any, ...]:
    """The example inputs stored in the archive at packaging (its reference run's inputs)."""
    import torch

    archive = open_archive(source)
    ref = archive.manifest.reference
    if ref is None:
        raise PackageError(archive.label, "the archive holds no example inputs (no reference run was recorded)")
    return tuple(torch.load(io.BytesIO(archive.read(ref.resource)), weights_only=False)["inputs"])


def check_reference(archive: Archive, model: Any) -> None:
    """ReferenceMismatch unless `model` gives, on the example inputs stored at packaging, the output recorded
    then (within the manifest's tolerances)."""
    import torch

    manifest = archive.manifest
    ref = manifest.reference
    if ref is None:
        return
    stored = torch.load(io.BytesIO(archive.read(ref.resource)), weights_only=False)
    signature = manifest.signature()
    with torch.no_grad():
        output = model(*_signature.prepare_inputs(model, manifest.inputs, stored["inputs"], signature))
        if manifest.streams:
            output = list(output)
    _, got = _signature.flatten_output(output)
    _, want = _signature.flatten_output(stored["output"])
    if len(got) != len(want):
        raise ReferenceMismatch(archive.label, f"the model returned {len(got)} outputs, {len(want)} were recorded")
    for (name, g), (_, w) in zip(got, want):
        problem = _difference(g, w, ref.rtol, ref.atol)
        if problem:
            raise ReferenceMismatch(
                archive.label,
                f"output {name!r} on the stored example inputs differs from the one recorded at packaging "
                f"({problem}); the code or the environment changed how the model computes: check the torch "
                "version and the requirements, or package the model again",
            )


def _difference(got: Any, want: Any, rtol: float, atol: float) -> str | None:
    """What differs between an output and the recorded one, or None if they agree within tolerance."""
    import torch

    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"a {type(got).__name__} where a tensor was recorded"
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"shape {list(got.shape)} {got.dtype} vs {list(want.shape)} {want.dtype}"
        if not torch.allclose(got, want, rtol=rtol, atol=atol):
            return f"max abs diff {(got.double() - want.double()).abs().max().item()}"
        return None
    return _json_difference(_values.to_json(got), _values.to_json(want), rtol, atol, "")


def _json_difference(got: Any, want: Any, rtol: float, atol: float, at: str) -> str | None:
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return None if abs(got - want) <= atol + rtol * abs(want) else f"{at or 'value'}: {got} vs {want}"
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
        for i, (g, w) in enumerate(zip(got, want)):
            problem = _json_difference(g, w, rtol, atol, f"{at}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(want, dict) and isinstance(got, dict) and got.keys() == want.keys():
        for k in want:
            problem = _json_difference(got[k], want[k], rtol, atol, f"{at}[{k!r}]")
            if problem:
                return problem
        return None
    return None if got == want else f"{at or 'value'}: {str(got)[:80]} vs {str(want)[:80]}"


# -- unpickling with weights in place --------------------------------------------------------------


class _RecordReader:
    """What PackageImporter asks of its zip reader, answered from an Archive; storages are not copied."""

    def __init__(self, archive: Archive, copy_weights: bool) -> None:
        self._archive = archive
        self._copy = copy_weights

    def get_record(self, name: str) -> bytes:
        return self._archive.read(name)

    def has_record(self, name: str) -> bool:
        return name in self._archive

    def get_all_records(self) -> list[str]:
        return self._archive.names()

    def serialization_id(self) -> str:
        rec = ".data/serialization_id"
        return self._archive.read(rec).decode() if rec in self._archive else ""

    def get_storage_from_record(self, name: str, numel: int, dtype: Any) -> Any:
        import torch

        view = self._archive.view_of(name)
        nbytes = numel * dtype.itemsize
        if len(view) < nbytes:
            raise PackageError(
                self._archive.label, f"record {name} holds {len(view)} bytes, {nbytes} expected: damaged archive"
            )
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        with warnings.catch_warnings():  # read-only on purpose: see the module docstring
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.frombuffer(view, dtype=dtype, count=numel)
        return tensor.clone() if self._copy else tensor


def unpickle(archive: Archive, entry: str, copy_weights: bool) -> Any:
    """The object pickled at `entry`, its storages views into the archive (or copies), unchecked: the caller
    has made the checks `load_archive` makes."""
    import torch
    from torch.package import PackageImporter

    class _Importer(PackageImporter):
        def __init__(self) -> None:
            # torch parses the zip directory (not the data) through a file over the view; then every
            # record, storages included, is served from the Archive instead.
            super().__init__(_BufferFile(archive.view))
            self.filename = archive.label
            self.zip_reader = _RecordReader(archive, copy_weights)

    package, _, name = entry.rpartition("/")
    importer = _Importer()
    with torch.inference_mode(not copy_weights), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        model = importer.load_pickle(package.replace("/", "."), name)
        if not callable(model):
            raise PackageError(archive.label, f"the entry point {entry!r} holds a {type(model).__name__}, which "
                                              "cannot be called")
        modules = [m for _, m in modules_of(model)]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
    for module in modules:
        module.eval()
        if not copy_weights:
            module.register_forward_pre_hook(_guard_enter)
            module.register_forward_hook(_guard_exit, always_call=True)
    return model


def modules_of(model: Any, depth: int = 3) -> Iterator[tuple[str, Any]]:
    """(attribute path, torch.nn.Module) of the model itself, or of the modules it holds (in attributes,
    lists and dicts, `depth` levels down)."""
    import torch

    seen: set[int] = set()

    def walk(obj: Any, prefix: str, level: int) -> Iterator[tuple[str, Any]]:
        if id(obj) in seen or level > depth:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            yield prefix, obj
            return
        if isinstance(obj, Mapping):
            items: Any = obj.items()
        elif isinstance(obj, (list, tuple)):
            items = enumerate(obj)
        elif hasattr(obj, "__dict__") and not inspect.isclass(obj) and not inspect.ismodule(obj):
            items = vars(obj).items()
        else:
            return
        for key, value in items:
            yield from walk(value, f"{prefix}.{key}" if prefix else str(key), level + 1)

    yield from walk(model, "", 0)


_guard = threading.local()
_inference_mode_enabled: Any = None


def _guard_enter(module: Any, args: Any) -> None:
    # Inference tensors refuse in-place updates only outside inference mode, so a caller's
    # inference_mode() must not reach the model's forward. Most callers are not in inference mode:
    # that path only records that there is nothing to undo.
    global _inference_mode_enabled
    if _inference_mode_enabled is None:
        import torch

        _inference_mode_enabled = torch.is_inference_mode_enabled
    ctx = None
    if _inference_mode_enabled():
        import torch

        ctx = torch._C._InferenceMode(False)  # what torch.inference_mode(False) enters, without its wrapper
        ctx.__enter__()
    try:
        _guard.stack.append(ctx)
    except AttributeError:
        _guard.stack = [ctx]


def _guard_exit(module: Any, args: Any, output: Any) -> None:
    if output is None:  # an always_call hook after forward raised (a model returning None is refused at save)
        exc = sys.exc_info()[1]
        if exc is not None and is_shared_write(exc) and hasattr(exc, "add_note"):
            if SHARED_WRITE_HINT not in getattr(exc, "__notes__", ()):
                exc.add_note(SHARED_WRITE_HINT)
    stack = getattr(_guard, "stack", None)
    if stack:
        ctx = stack.pop()
        if ctx is not None:
            ctx.__exit__(None, None, None)
