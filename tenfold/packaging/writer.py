"""Writing archives: a torch.package of the model's code and data, plus manifest.json.

The model is any callable: a torch.nn.Module, an object with __call__ (a class holding modules, a
tokenizer, a corpus...), a function taking the inputs, or a factory (a function or class called with no
arguments) of one. Only the user's own code is interned; the standard library and installed distributions
are extern, and the manifest records the versions of those the model needs to load and run as requirements.
"""

from __future__ import annotations

import inspect
import io
import os
import platform
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import _dependencies, _signature, _values
from .archive import Archive, open_archive, open_source
from .errors import PackagingFailed
from .manifest import MANIFEST_RECORD, Manifest, ReferenceCheck, content_digest
from .reader import modules_of

ENTRY_PACKAGE, ENTRY_RESOURCE = "model", "model.pkl"
REFERENCE_PACKAGE, REFERENCE_RESOURCE = "tenfold", "reference.pt"
REFERENCE_RTOL, REFERENCE_ATOL = 1e-4, 1e-5

Progress = Callable[[int], Any]


def save(
    model_or_factory: Any,
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
    """Package a model as a torch.package archive at `path` and return its manifest.

    `model_or_factory` is a torch.nn.Module, any other object with __call__ (a function that takes arguments
    too), or a factory: a function or a class, called with no arguments to make the model. `example_inputs`
    is the tuple of positional arguments of one call (a single tensor is taken as a one-tuple); each may be
    a tensor, a numpy array, bytes or a JSON value (str, int, float, bool, None, list, dict). The model runs
    once on them: the signature (from the examples and the call's type hints), a reference output, and any
    weight the run changed are recorded in the manifest. `dynamic` maps tensor inputs to the dimensions that
    may vary (default: dimension 0, the batch).

    Dependencies: the model's own modules are interned (their source goes into the archive); the standard
    library and every installed distribution are extern (taken from the serving environment). The manifest
    lists, and records the versions of as requirements, the externs that loading and calling the model
    need: what the pickled model refers to, what its modules import at their top level, and what the call
    on `example_inputs` imported. A module imported only in code that did not run then (the factory, a
    branch the example did not take) is taken from the serving environment when it is there, but not
    required of it; name it in `extern` to require it. `intern`, `extern` and `mock` are torch.package
    patterns that take precedence. `progress` is called with byte counts as weights are written and hashed.
    The archive is written next to `path` and moved there only once complete.
    """
    return _save(_model_of(model_or_factory), path, example_inputs=example_inputs, name=name, intern=intern,
                 extern=extern, mock=mock, dynamic=dynamic, progress=progress, importer=None)


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
    from torch.package import PackageImporter, sys_importer

    archive = open_archive(source)
    archive.check_entry(resource)
    importer = PackageImporter(os.fspath(source))
    package, _, res = resource.rpartition("/")
    model = importer.load_pickle(package.replace("/", "."), res)
    if not callable(model):
        raise PackagingFailed(archive.label, f"{resource!r} holds a {type(model).__name__}, which cannot be called")
    return _save(model, path, example_inputs=example_inputs, name=name or Path(source).stem, intern=archive.modules(),
                 extern=list(importer.extern_modules), mock=(), dynamic=dynamic, progress=progress,
                 importer=(importer, sys_importer))


def _model_of(obj: Any) -> Any:
    """The model itself: `obj`, or what the factory `obj` makes."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj
    # A function that cannot be called without arguments is the model itself, not a factory of one.
    if inspect.isclass(obj) or (inspect.isfunction(obj) and not _needs_arguments(obj)):
        model = obj()
        if not callable(model):
            raise TypeError(f"the factory {obj.__qualname__} returned a {type(model).__name__}, which cannot be "
                            "called; return the model (an object with __call__ or a torch.nn.Module)")
        return model
    if callable(obj):
        return obj
    raise TypeError(f"save takes a model (a torch.nn.Module or an object with __call__) or a factory of one (a "
                    f"function or class called with no arguments), not a {type(obj).__name__}")


def _needs_arguments(fn: Callable[..., Any]) -> bool:
    return any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in inspect.signature(fn).parameters.values())


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if _signature._is_tensor(example_inputs):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be the tuple of the call's positional arguments (or one tensor), "
                        f"not a {type(example_inputs).__name__}; write ({example_inputs!r},) for one argument")
    return tuple(example_inputs)


def _tensors(model: Any) -> dict[str, Any]:
    """Every parameter and buffer the model holds, by name."""
    named: dict[str, Any] = {}
    for prefix, module in modules_of(model):
        dot = f"{prefix}." if prefix else ""
        named.update({dot + n: t for n, t in module.named_parameters(remove_duplicate=False)})
        named.update({dot + n: t for n, t in module.named_buffers(remove_duplicate=False)})
    return named


def _raw(t: Any) -> Any:
    import torch

    # Compared as bytes: torch.equal would call a NaN weight changed.
    return t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _storable(obj: Any) -> Any:
    """A copy of an example input or output fit to be stored in the archive and read back anywhere: tensors
    and arrays copied, plain values kept, anything else (pydantic models...) as its JSON form."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().contiguous()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_storable(o) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _storable(v) for k, v in obj.items()}
    return _values.to_json(obj)


def _check_main(model: Any, label: str) -> None:
    for _, module in [("", model), *modules_of(model)]:
        if type(module).__module__ == "__main__":
            raise PackagingFailed(
                label,
                f"{type(module).__qualname__} is defined in __main__, whose code cannot be packaged; "
                "move the model to an importable module",
            )


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
    from torch.package import GlobGroup, PackageExporter
    from torch.package.package_exporter import PackagingError

    label = os.fspath(path)
    _check_main(model, label)
    inputs = _as_inputs(example_inputs)
    try:
        specs = _signature.input_specs(model, inputs, dynamic)
        signature = "(" + ", ".join(s.describe() for s in specs) + ")"
        call_inputs = _signature.prepare_inputs(model, specs, inputs, signature)
    except (TypeError, ValueError) as exc:
        raise PackagingFailed(label, f"example_inputs do not fit the model's call: {exc}") from None
    for _, module in modules_of(model):
        module.eval()
    state = _tensors(model)
    before = {n: _raw(t).clone() for n, t in state.items()}
    try:
        with torch.no_grad(), _dependencies.recording_imports() as ran:
            output = model(*call_inputs)
            streams = _signature.is_stream(output)
            if streams:  # a generator runs as it is read: its items are the example's output
                output = list(output)
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
        structure, out_specs = (_signature.stream_specs(model, output) if streams else
                                _signature.output_specs(model, output, specs, call_inputs))
        stored_output = _storable(output)
    except (TypeError, ValueError) as exc:
        raise PackagingFailed(label, f"the model's output cannot be described: {exc}") from None
    reference = io.BytesIO()
    torch.save({"inputs": _storable(inputs), "output": stored_output}, reference)

    seen: set[Any] = set()
    user_extern, user_intern, user_mock = list(extern), list(intern), list(mock)

    class _Exporter(PackageExporter):
        def _persistent_id(self, obj: Any) -> Any:
            pid = super()._persistent_id(obj)
            if progress is not None and pid is not None and pid[0] == "storage" and pid[2] not in seen:
                seen.add(pid[2])
                progress(obj.nbytes())
            return pid

        def add_dependency(self, module_name: str, dependencies: bool = True) -> None:
            # A module no pattern names is interned if it is the user's code, extern if it comes from the
            # standard library or an installed distribution (decided once per top-level package).
            node = self.dependency_graph.nodes.get(module_name, {}) if module_name in self.dependency_graph else {}
            if not node.get("provided") and not any(p.matches(module_name) for p in self.patterns):
                top = module_name.partition(".")[0]
                where = _dependencies.origin(top)
                if where == "user":
                    self.intern([top, f"{top}.**"])
                elif where in ("stdlib", "installed"):
                    self.extern([top, f"{top}.**"])
            super().add_dependency(module_name, dependencies)

    target = Path(label)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            kwargs = {} if importer is None else {"importer": importer}
            with _Exporter(str(tmp), **kwargs) as exporter:
                # First match wins: the caller's patterns before the automatic ones.
                if user_extern:
                    exporter.extern(user_extern)
                if user_mock:
                    exporter.mock(user_mock)
                if user_intern:
                    exporter.intern(user_intern)
                exporter.save_pickle(ENTRY_PACKAGE, ENTRY_RESOURCE, model)
                exporter.save_binary(REFERENCE_PACKAGE, REFERENCE_RESOURCE, reference.getvalue())
                try:
                    exporter._validate_dependency_graph()
                except PackagingError as exc:
                    raise PackagingFailed(label, _packaging_problems(exc)) from None
                interned = exporter.interned_modules()
                # The caller's own extern patterns are required whatever the code does: the way to say that a
                # module imported only on a path the example did not take is needed.
                needed = _dependencies.needed_modules(exporter.dependency_graph, ran=ran,
                                                      always=GlobGroup(user_extern).matches)
                externed = [m for m in exporter.externed_modules() if m in needed]
                mocked = exporter.mocked_modules()
        manifest = _finish(tmp, label, {
            "name": name or (model.__name__ if inspect.isfunction(model) else type(model).__name__),
            "entry": f"{ENTRY_PACKAGE}/{ENTRY_RESOURCE}",
            "inputs": specs,
            "outputs": out_specs,
            "output_structure": structure,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "interned_modules": sorted(interned),
            "extern_modules": sorted(externed),
            "requirements": [str(r) for r in _dependencies.requirements(externed)],
            "mocked_modules": sorted(mocked),
            "reference": ReferenceCheck(resource=f"{REFERENCE_PACKAGE}/{REFERENCE_RESOURCE}", rtol=REFERENCE_RTOL,
                                        atol=REFERENCE_ATOL),
            "writes_weights": writes,
        }, progress)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def _packaging_problems(exc: Any) -> str:
    """torch.package's errors, one line per module, each with the argument that fixes it."""
    fixes = {
        "NO_ACTION": "pass intern=['{m}'] to put its source in the archive, extern=['{m}'] to take it from the "
                     "serving environment, or mock=['{m}'] if the model never calls it",
        "IS_EXTENSION_MODULE": "pass extern=['{m}'] (a C extension cannot go into an archive; the serving "
                               "environment must have it)",
        "NO_DUNDER_FILE": "pass extern=['{m}'] or mock=['{m}'] (it has no source file to put in the archive)",
        "SOURCE_FILE_NOT_FOUND": "pass extern=['{m}'] or mock=['{m}'] (its source file is missing)",
        "DEPENDENCY_RESOLUTION_FAILED": "pass extern=['{m}'] or mock=['{m}'] (its imports could not be followed)",
        "DENIED": "remove it from the denied patterns",
        "MOCKED_BUT_STILL_USED": "pass intern=['{m}'] or extern=['{m}'] instead of mocking it (the model uses it)",
    }
    lines = []
    graph = exc.dependency_graph
    for module, attrs in sorted(graph.nodes.items()):
        reason = attrs.get("error")
        if reason is None:
            continue
        context = attrs.get("error_context")
        detail = f"{reason.value}{f' ({context})' if context else ''}"
        fix = fixes.get(reason.name, "pass extern=['{m}'] or mock=['{m}']").format(m=module)
        lines.append(f"  module {module}: {detail}\n    fix: {fix}")
    return ("the model's code could not be packaged:\n" + "\n".join(lines) +
            "\n(with `tenfold package`: --intern, --extern and --mock take the same patterns)")


def _finish(tmp: Path, label: str, fields: dict[str, Any], progress: Progress | None) -> Manifest:
    """The archive at `tmp` completed: every record hashed into the manifest, which is appended last."""
    view, _ = open_source(tmp)
    archive = Archive(view, label)
    digests = {}
    storages = set(archive.storages())
    for record in archive.names():
        digests[record] = archive.record_sha256(record)
        if progress is not None and record in storages:
            progress(archive.records[record].size)
    manifest = Manifest.model_validate({
        **fields,
        "weight_bytes": archive.weight_bytes(),
        "tensor_count": len(storages),
        "record_sha256": digests,
        "content_sha256": "",
    })
    manifest.content_sha256 = content_digest(manifest)
    prefix = archive.prefix
    del archive, view
    with zipfile.ZipFile(tmp, "a") as zf:
        info = zipfile.ZipInfo(prefix + MANIFEST_RECORD, date_time=(1980, 1, 1, 0, 0, 0))
        zf.writestr(info, manifest.model_dump_json(indent=2), compress_type=zipfile.ZIP_STORED)
    return manifest
