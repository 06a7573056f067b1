"""Writing archives: a torch.package of the model's code and weights, plus manifest.json."""

from __future__ import annotations

import io
import os
import platform
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _signature
from .archive import Archive, open_archive, open_source
from .errors import PackagingFailed
from .manifest import MANIFEST_RECORD, Manifest, ReferenceCheck, content_digest

if TYPE_CHECKING:
    import torch

ENTRY_PACKAGE, ENTRY_RESOURCE = "model", "model.pkl"
REFERENCE_PACKAGE, REFERENCE_RESOURCE = "tenfold", "reference.pt"
REFERENCE_RTOL, REFERENCE_ATOL = 1e-4, 1e-5

Progress = Callable[[int], Any]


def save(
    model_or_factory: torch.nn.Module | Callable[[], torch.nn.Module],
    path: str | os.PathLike[str],
    *,
    example_inputs: Any,
    name: str | None = None,
    intern: Sequence[str] = (),
    extern: Sequence[str] = (),
    mock: Sequence[str] = (),
    dynamic: Mapping[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Package a model (or a zero-argument factory of one) as a torch.package archive at `path`.

    The model's own modules are interned (their source goes into the archive); `intern`, `extern` and
    `mock` add torch.package patterns (the caller's extern and mock take precedence). The model is put
    in eval mode and run once on `example_inputs` (a tensor or a tuple of tensors): the input and output
    signatures, a reference output, and any weight that run changed are recorded in the manifest.
    `dynamic` maps input names to the dimensions that may vary (default: dimension 0, the batch).
    `progress` is called with byte counts as weights are written and hashed.
    The archive is written next to `path` and moved there only once complete.
    """
    import torch

    model = model_or_factory if isinstance(model_or_factory, torch.nn.Module) else model_or_factory()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the factory returned {type(model).__name__}, not a torch.nn.Module")
    return _save(model, path, example_inputs=example_inputs, name=name, intern=intern, extern=extern, mock=mock,
                 dynamic=dynamic, progress=progress, importer=None)


def repackage(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    resource: str,
    example_inputs: Any,
    name: str | None = None,
    dynamic: Mapping[str, Sequence[int]] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Add a manifest to a plain torch.package archive: load `resource` from it and save it again with
    tenfold, keeping its code (interned modules stay interned, externs stay extern)."""
    import torch
    from torch.package import PackageImporter, sys_importer

    archive = open_archive(source)
    archive.check_entry(resource)
    importer = PackageImporter(os.fspath(source))
    package, _, res = resource.rpartition("/")
    model = importer.load_pickle(package.replace("/", "."), res)
    if not isinstance(model, torch.nn.Module):
        raise PackagingFailed(archive.label, f"{resource!r} holds a {type(model).__name__}, not a torch.nn.Module")
    return _save(model, path, example_inputs=example_inputs, name=name or Path(source).stem, intern=archive.modules(),
                 extern=list(importer.extern_modules), mock=(), dynamic=dynamic, progress=progress,
                 importer=(importer, sys_importer))


def _default_interns(model: Any, label: str) -> list[str]:
    tops = set()
    for m in model.modules():
        module = type(m).__module__
        if module == "__main__":
            raise PackagingFailed(
                label,
                f"{type(m).__qualname__} is defined in __main__, whose code cannot be packaged; "
                "move the model to an importable module",
            )
        top = module.split(".")[0]
        if top != "torch" and not top.startswith("<torch_package_"):
            tops.add(top)
    return [p for top in sorted(tops) for p in (top, f"{top}.**")]


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"example_inputs must be a tensor or a tuple of tensors; input {i} is a {type(t).__name__}")
    return inputs


def _tensors(model: Any) -> dict[str, Any]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def _raw(t: Any) -> Any:
    import torch

    # Compared as bytes: torch.equal would call a NaN weight changed.
    return t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _clone(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().contiguous()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _save(
    model: Any,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any,
    name: str | None,
    intern: Sequence[str],
    extern: Sequence[str],
    mock: Sequence[str],
    dynamic: Mapping[str, Sequence[int]] | None,
    progress: Progress | None,
    importer: Any,
) -> Manifest:
    import torch
    from torch.package import PackageExporter
    from torch.package.package_exporter import PackagingError

    label = os.fspath(path)
    inputs = _as_inputs(example_inputs)
    names = _signature.input_names(model, len(inputs))
    specs = _signature.input_specs(names, inputs, dynamic)
    model.eval()
    state = _tensors(model)
    before = {n: _raw(t).clone() for n, t in state.items()}
    try:
        with torch.no_grad():
            output = model(*inputs)
    except Exception as exc:
        raise PackagingFailed(label, f"the model failed on example_inputs ({type(exc).__name__}: {exc}); "
                                     "fix the model or the example inputs") from exc
    writes = sorted(n for n, t in state.items() if not torch.equal(before[n], _raw(t)))
    del before
    if writes:
        warnings.warn(
            f"{label}: the model changed {', '.join(writes)} while running on example_inputs; shared weights are "
            "read-only, so this archive will need copy_weights=True to load",
            UserWarning,
            stacklevel=3,
        )
    try:
        structure, named = _signature.flatten_output(output)
    except TypeError as exc:
        raise PackagingFailed(label, str(exc)) from None
    out_specs = _signature.output_specs(named, specs, inputs)
    reference = io.BytesIO()
    torch.save({"inputs": _clone(inputs), "output": _clone(output)}, reference)

    class _Exporter(PackageExporter):
        def _persistent_id(self, obj: Any) -> Any:
            pid = super()._persistent_id(obj)
            if progress is not None and pid is not None and pid[0] == "storage" and pid[2] not in seen:
                seen.add(pid[2])
                progress(obj.nbytes())
            return pid

    seen: set[Any] = set()
    target = Path(label)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            kwargs = {} if importer is None else {"importer": importer}
            with _Exporter(str(tmp), **kwargs) as exporter:
                # First match wins: the caller's extern and mock before the default interns.
                if extern:
                    exporter.extern(list(extern))
                if mock:
                    exporter.mock(list(mock))
                interns = list(intern) + _default_interns(model, label)
                if interns:
                    exporter.intern(interns)
                exporter.save_pickle(ENTRY_PACKAGE, ENTRY_RESOURCE, model)
                exporter.save_binary(REFERENCE_PACKAGE, REFERENCE_RESOURCE, reference.getvalue())
                try:
                    exporter._validate_dependency_graph()
                except PackagingError as exc:
                    raise PackagingFailed(
                        label, f"{exc}\nPass intern=, extern= or mock= patterns (tenfold package: see --help)"
                    ) from None
                interned = exporter.interned_modules()
                externed = exporter.externed_modules()
                mocked = exporter.mocked_modules()
        manifest = _finish(tmp, label, model, name, specs, out_specs, structure, interned, externed, mocked, writes,
                           progress)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def _finish(
    tmp: Path, label: str, model: Any, name: str | None, specs: list, out_specs: list, structure: str,
    interned: list[str], externed: list[str], mocked: list[str], writes: list[str], progress: Progress | None,
) -> Manifest:
    import torch

    view, _ = open_source(tmp)
    archive = Archive(view, label)
    digests = {}
    storages = set(archive.storages())
    for record in archive.names():
        digests[record] = archive.record_sha256(record)
        if progress is not None and record in storages:
            progress(archive.records[record].size)
    manifest = Manifest(
        name=name or type(model).__name__,
        entry=f"{ENTRY_PACKAGE}/{ENTRY_RESOURCE}",
        inputs=specs,
        outputs=out_specs,
        output_structure=structure,  # type: ignore[arg-type]  # one of the four, by flatten_output
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        interned_modules=sorted(interned),
        extern_modules=sorted(externed),
        mocked_modules=sorted(mocked),
        weight_bytes=archive.weight_bytes(),
        tensor_count=len(archive.storages()),
        reference=ReferenceCheck(resource=f"{REFERENCE_PACKAGE}/{REFERENCE_RESOURCE}", rtol=REFERENCE_RTOL,
                                 atol=REFERENCE_ATOL),
        writes_weights=writes,
        record_sha256=digests,
        content_sha256="",
    )
    manifest.content_sha256 = content_digest(manifest)
    prefix = archive.prefix
    del archive, view
    with zipfile.ZipFile(tmp, "a") as zf:
        info = zipfile.ZipInfo(prefix + MANIFEST_RECORD, date_time=(1980, 1, 1, 0, 0, 0))
        zf.writestr(info, manifest.model_dump_json(indent=2), compress_type=zipfile.ZIP_STORED)
    return manifest
