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

import importlib.util
import io
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from . import _signature
from ._archive import Archive, Source, _BufferFile, open_source, sha256_of
from .errors import (
    DigestMismatch,
    EntryPointMissing,
    ExternMissing,
    ManifestInvalid,
    ManifestMissing,
    PackageError,
    PinMismatch,
    ReferenceMismatch,
    SharedWeightWrite,
    TorchVersionWarning,
)
from .manifest import MANIFEST_RECORD, Manifest, content_digest

if TYPE_CHECKING:
    import torch

_INFERENCE_WRITE = "Inplace update to inference tensor outside InferenceMode"
SHARED_WRITE_HINT = (
    "tenfold: this model wrote into one of its weights during inference. Weights loaded by tenfold are "
    "shared by every interpreter and read-only; load with copy_weights=True to give this model a private, "
    "writable copy."
)


def is_shared_write(exc: BaseException) -> bool:
    """True if `exc` is torch refusing an in-place write into a shared (inference) weight."""
    return isinstance(exc, RuntimeError) and _INFERENCE_WRITE in str(exc)


def open_archive(source: Source) -> Archive:
    view, label = open_source(source)
    return Archive(view, label)


def archive_sha256(source: Source) -> str:
    """Hex sha256 of the archive's bytes: the value to pin with `sha256=`."""
    view, _ = open_source(source)
    return sha256_of(view)


def read_manifest(source: Source) -> Manifest:
    """The archive's manifest (reads manifest.json only; no digest is checked)."""
    return manifest_of(open_archive(source))


def verify_archive(source: Source, *, sha256: str | None = None) -> Manifest:
    """Check the whole archive: zip structure, manifest, content digests, the `sha256` pin, entry point and
    externs. Returns the manifest; raises a PackageError subclass naming the file and the problem."""
    archive = open_archive(source)
    check_pin(archive, sha256)
    manifest = manifest_of(archive)
    check_digests(archive, manifest)
    check_entry(archive, manifest.entry)
    check_externs(archive, manifest.extern_modules)
    check_torch_version(archive, manifest)
    return manifest


def load(
    source: Source,
    *,
    sha256: str | None = None,
    verify: bool = False,
    resource: str | None = None,
    copy_weights: bool = False,
) -> torch.nn.Module:
    """Load the model of an archive, in eval mode, with its weights as views into `source` (no copy).

    `source` is a path (memory-mapped read-only) or a bytes-like buffer (used in place: keep it alive and
    unchanged while the model lives). `sha256` pins the archive's bytes. `verify=True` also checks every
    record against the manifest's digests and re-runs the model on the stored example inputs.
    `resource` loads a plain torch.package archive (no manifest) from that pickle, e.g. "model/model.pkl".
    `copy_weights=True` copies the weights into private, writable memory.
    """
    archive = open_archive(source)
    return load_archive(archive, sha256=sha256, verify=verify, resource=resource, copy_weights=copy_weights)


def load_archive(
    archive: Archive,
    *,
    sha256: str | None = None,
    verify: bool = False,
    resource: str | None = None,
    copy_weights: bool = False,
) -> torch.nn.Module:
    check_pin(archive, sha256)
    manifest: Manifest | None = None
    if resource is None or MANIFEST_RECORD in archive:
        manifest = manifest_of(archive)
        if verify:
            check_digests(archive, manifest)
        check_torch_version(archive, manifest)
        check_shared_writes(archive, manifest, copy_weights)
    entry = resource if resource is not None else manifest.entry  # type: ignore[union-attr]
    check_entry(archive, entry)
    check_externs(archive, manifest.extern_modules if manifest else _archive_externs(archive))
    model = _unpickle(archive, entry, copy_weights)
    if verify and manifest is not None and manifest.reference is not None:
        check_reference(archive, manifest, model)
    return model


# -- checks ----------------------------------------------------------------------------------------


def manifest_of(archive: Archive) -> Manifest:
    if MANIFEST_RECORD not in archive:
        raise ManifestMissing(
            archive.label,
            "no manifest.json: this archive was not made by tenfold.packaging.save. Load it by naming its pickle "
            "(load(path, resource='model/model.pkl')) or add a manifest with "
            "`tenfold package --from-torch-package ARCHIVE --resource model/model.pkl`",
        )
    try:
        return Manifest.model_validate_json(archive.read(MANIFEST_RECORD))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors()[:5])
        raise ManifestInvalid(
            archive.label, f"manifest.json is invalid ({problems}); it was damaged or edited: package the model again"
        ) from None


def check_pin(archive: Archive, sha256: str | None) -> None:
    if sha256 is None:
        return
    actual = sha256_of(archive.view)
    if actual != sha256.lower():
        raise PinMismatch(
            archive.label,
            f"sha256 is {actual}, but {sha256} was pinned: this is not the archive you pinned. "
            "Fetch the right one, or pin the new digest if the change is intended",
        )


def check_digests(archive: Archive, manifest: Manifest) -> None:
    if content_digest(manifest) != manifest.content_sha256:
        raise DigestMismatch(
            archive.label,
            "manifest.json was edited after packaging (its content_sha256 does not match its fields); "
            "get an intact copy or package the model again",
        )
    present = set(archive.names()) - {MANIFEST_RECORD}
    expected = set(manifest.record_sha256)
    problems = [f"{n} missing" for n in sorted(expected - present)]
    problems += [f"{n} added" for n in sorted(present - expected)]
    problems += [f"{n} changed" for n in sorted(expected & present) if archive.sha256(n) != manifest.record_sha256[n]]
    if problems:
        shown = ", ".join(problems[:10]) + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DigestMismatch(
            archive.label,
            f"content does not match the manifest's digests ({shown}): the archive was modified or damaged "
            "after packaging; get an intact copy or package the model again",
        )


def check_shared_writes(archive: Archive, manifest: Manifest, copy_weights: bool) -> None:
    if manifest.writes_weights and not copy_weights:
        raise SharedWeightWrite(
            archive.label,
            f"model {manifest.name!r} writes into its weights during inference (it changed "
            f"{', '.join(manifest.writes_weights[:5])} when it ran at packaging); weights loaded by tenfold are "
            "shared by every interpreter and read-only: load it with copy_weights=True",
        )


def check_entry(archive: Archive, entry: str) -> None:
    if entry not in archive:
        pickles = sorted(n for n in archive.names() if n.endswith(".pkl"))
        raise EntryPointMissing(
            archive.label,
            f"the entry point {entry!r} is not in the archive; pickles it holds: {pickles or 'none'}",
        )


def _archive_externs(archive: Archive) -> list[str]:
    if ".data/extern_modules" not in archive:
        return []
    return [m for m in archive.read(".data/extern_modules").decode().split("\n") if m]


def check_externs(archive: Archive, modules: list[str]) -> None:
    missing = []
    for name in modules:
        if name in sys.modules:
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ExternMissing(
            archive.label,
            f"needs module(s) {', '.join(missing)} from this environment (extern), but they cannot be imported "
            "here; install them, or package the model with them interned",
        )


def check_torch_version(archive: Archive, manifest: Manifest) -> None:
    import torch

    def major_minor(v: str) -> tuple[str, ...]:
        return tuple(v.split("+")[0].split(".")[:2])

    if major_minor(manifest.torch_version) != major_minor(torch.__version__):
        warnings.warn(
            TorchVersionWarning(
                f"{archive.label}: packaged with torch {manifest.torch_version}, loaded with torch "
                f"{torch.__version__}; if loading fails or outputs differ, package the model again with this torch"
            ),
            stacklevel=4,
        )


def check_reference(archive: Archive, manifest: Manifest, model: Any) -> None:
    import torch

    ref = manifest.reference
    if ref is None:
        return
    stored = torch.load(io.BytesIO(archive.read(ref.resource)), weights_only=True)
    with torch.no_grad():
        output = model(*stored["inputs"])
    _, got = _signature.flatten_output(output)
    _, want = _signature.flatten_output(stored["output"])
    if len(got) != len(want):
        raise ReferenceMismatch(archive.label, f"the model returned {len(got)} outputs, {len(want)} were recorded")
    for (name, g), (_, w) in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype or not torch.allclose(g, w, rtol=ref.rtol, atol=ref.atol):
            diff = (g.double() - w.double()).abs().max().item() if g.shape == w.shape else "n/a"
            raise ReferenceMismatch(
                archive.label,
                f"output {name!r} on the stored example inputs differs from the one recorded at packaging "
                f"(shape {list(g.shape)} vs {list(w.shape)}, max abs diff {diff}); the code or the environment "
                "changed how the model computes: check the torch version, or package the model again",
            )


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


def _unpickle(archive: Archive, entry: str, copy_weights: bool) -> Any:
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
        if not isinstance(model, torch.nn.Module):
            raise PackageError(
                archive.label, f"the entry point {entry!r} holds a {type(model).__name__}, not a torch.nn.Module"
            )
        for p in model.parameters():
            p.requires_grad_(False)
    model.eval()
    if not copy_weights:
        model.register_forward_pre_hook(_guard_enter)
        model.register_forward_hook(_guard_exit, always_call=True)
    return model


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
