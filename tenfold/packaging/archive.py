"""An archive, opened and checked: a torch.package zip seen in place, with its manifest and every check
that can be made without loading the model.

torch.package writes every record uncompressed (zip method 0) at a 64-byte-aligned offset, so a
record's bytes are used where they lie: in a memory-mapped file or in a caller's buffer. Nothing here
imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import mmap
import os
import struct
import sys
import warnings
import zipfile
from typing import Any, Union

from pydantic import ValidationError

from . import _dependencies
from .errors import (
    DigestMismatch,
    EntryPointMissing,
    ExternMissing,
    ManifestInvalid,
    ManifestMissing,
    NotAnArchive,
    PinMismatch,
    RequirementMismatch,
    RequirementWarning,
    SharedWeightWrite,
    TorchVersionWarning,
)
from .manifest import MANIFEST_RECORD, Manifest, content_digest

# A path, or any bytes-like object: bytes, bytearray, memoryview, a numpy uint8 array, a PickleBuffer.
Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_MAGIC = b"PK\x03\x04"
_END_MAGIC = b"PK\x05\x06"
_END_SIZE = 22


class _BufferFile(io.RawIOBase):
    """A read-only, seekable file over a memoryview (zipfile reads only the directory through it)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        data = bytes(self._view[self._pos : end])
        self._pos = max(self._pos, end)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Record:
    __slots__ = ("offset", "size", "compressed", "info")

    def __init__(self, offset: int, size: int, compressed: bool, info: zipfile.ZipInfo) -> None:
        self.offset, self.size, self.compressed, self.info = offset, size, compressed, info


def open_source(source: Source) -> tuple[memoryview, str]:
    """A flat read-only byte view of `source` and a label naming it in messages.

    A path is memory-mapped read-only (its pages are shared with the page cache, and a stray write
    through a weight faults instead of changing the file); a buffer is used as it is.
    """
    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        try:
            with open(label, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise NotAnArchive(label, "the file is empty, not a zip archive; package the model again")
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise FileNotFoundError(f"{label}: no such archive") from None
        return memoryview(mapped), label
    try:
        view = memoryview(source)
    except TypeError:
        raise TypeError(
            f"source must be a path or a bytes-like object (bytes, memoryview, numpy uint8 array), "
            f"not {type(source).__name__}"
        ) from None
    if not view.contiguous:
        raise ValueError("source buffer must be contiguous")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    return view.toreadonly(), f"<archive buffer of {view.nbytes} bytes>"


class Archive:
    """The records of a torch.package zip, located in `view` (names without the archive's top folder),
    and the checks an archive must pass before its model is loaded. Each check raises a PackageError
    subclass that names the archive, the problem and what to do."""

    def __init__(self, view: memoryview, label: str) -> None:
        self.view = view
        self.label = label
        self._manifest: Manifest | None = None
        self._check_end()
        try:
            zf = zipfile.ZipFile(_BufferFile(view))
            infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error) as exc:
            raise NotAnArchive(
                label, f"not a zip archive, or truncated ({exc}); copy or package the model again"
            ) from None
        if not infos:
            raise NotAnArchive(label, "the zip archive is empty; package the model again")
        self.prefix = infos[0].filename.split("/", 1)[0] + "/"
        self.records: dict[str, _Record] = {}
        for info in infos:
            if not info.filename.startswith(self.prefix) or info.is_dir():
                continue
            offset = self._data_offset(info)
            if offset + info.compress_size > len(view):
                raise NotAnArchive(label, f"record {info.filename} runs past the end: truncated; copy it again")
            name = info.filename[len(self.prefix) :]
            self.records[name] = _Record(offset, info.file_size, info.compress_type != zipfile.ZIP_STORED, info)

    def _check_end(self) -> None:
        # zipfile accepts any end-of-directory record in the last 64 KiB, and a torch.package holds
        # nested zips (torch.save blobs): a truncated archive could pass as one of those. The real one
        # ends the file, with its comment.
        tail = bytes(self.view[max(0, len(self.view) - (1 << 16) - _END_SIZE) :])
        pos = tail.rfind(_END_MAGIC)
        while pos >= 0:
            comment = int.from_bytes(tail[pos + 20 : pos + 22], "little") if pos + 22 <= len(tail) else -1
            if pos + _END_SIZE + comment == len(tail):
                return
            pos = tail.rfind(_END_MAGIC, 0, pos)
        raise NotAnArchive(
            self.label, "not a zip archive, or truncated (no end-of-archive record at its end); "
            "copy or package the model again"
        )

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        start = info.header_offset
        header = bytes(self.view[start : start + _LOCAL_HEADER.size])
        if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_MAGIC:
            raise NotAnArchive(self.label, f"bad local header for {info.filename}: truncated or corrupt")
        fields = _LOCAL_HEADER.unpack(header)
        return start + _LOCAL_HEADER.size + fields[10] + fields[11]

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def names(self) -> list[str]:
        return list(self.records)

    def view_of(self, name: str) -> memoryview:
        """The record's bytes where they lie (no copy) if stored uncompressed, else a decompressed copy."""
        rec = self.records[name]
        if rec.compressed:
            with zipfile.ZipFile(_BufferFile(self.view)) as zf:
                return memoryview(zf.read(rec.info))
        return self.view[rec.offset : rec.offset + rec.size]

    def read(self, name: str) -> bytes:
        return bytes(self.view_of(name))

    def record_sha256(self, name: str) -> str:
        return hashlib.sha256(self.view_of(name)).hexdigest()

    def storages(self) -> list[str]:
        return [n for n in self.records if n.startswith(".data/") and n.endswith(".storage")]

    def weight_bytes(self) -> int:
        return sum(self.records[n].size for n in self.storages())

    def modules(self) -> list[str]:
        """The Python modules whose source is in the archive (interned)."""
        return sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in self.records
                      if n.endswith(".py") and not n.startswith(".data/"))

    def extern_modules(self) -> list[str]:
        """The modules torch.package recorded as extern (taken from the loading environment)."""
        record = ".data/extern_modules"
        return [m for m in self.read(record).decode().split("\n") if m] if record in self else []

    def optional_externs(self) -> list[str]:
        """Top-level packages torch.package lists as extern but the manifest does not require, the standard
        library left out: imported only by code that did not run when the model was packaged (its factory,
        a branch its example inputs did not take). Loading takes them from the environment if there."""
        required = {m.split(".")[0] for m in self.manifest.extern_modules}
        tops = {m.split(".")[0] for m in self.extern_modules()} - required
        return sorted(t for t in tops if t not in sys.stdlib_module_names and t not in sys.builtin_module_names)

    # -- checks ------------------------------------------------------------------------------------

    @property
    def has_manifest(self) -> bool:
        return MANIFEST_RECORD in self

    @property
    def manifest(self) -> Manifest:
        """The archive's manifest.json, parsed (once) and validated against the schema."""
        if self._manifest is None:
            if not self.has_manifest:
                raise ManifestMissing(
                    self.label,
                    "no manifest.json: this archive was not made by tenfold.packaging.save. Load it by naming its "
                    "pickle (load(path, resource='model/model.pkl')) or add a manifest with "
                    "`tenfold package --from-torch-package ARCHIVE --resource model/model.pkl`",
                )
            try:
                self._manifest = Manifest.model_validate_json(self.read(MANIFEST_RECORD))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}"
                                     for e in exc.errors()[:5])
                raise ManifestInvalid(
                    self.label, f"manifest.json is invalid ({problems}); it was damaged or edited: package the "
                    "model again"
                ) from None
        return self._manifest

    def sha256(self) -> str:
        """Hex sha256 of the whole archive: the value to pin."""
        return sha256_of(self.view)

    def check_pin(self, sha256: str | None) -> None:
        """PinMismatch unless the archive's sha256 is `sha256` (nothing to check when None)."""
        if sha256 is None:
            return
        actual = self.sha256()
        if actual != sha256.lower():
            raise PinMismatch(
                self.label,
                f"sha256 is {actual}, but {sha256} was pinned: this is not the archive you pinned. "
                "Fetch the right one, or pin the new digest if the change is intended",
            )

    def check_digests(self) -> None:
        """DigestMismatch if the manifest was edited, or any record added, removed or changed since packaging."""
        manifest = self.manifest
        written = json.loads(self.read(MANIFEST_RECORD))
        if content_digest(written) != manifest.content_sha256:
            raise DigestMismatch(
                self.label,
                "manifest.json was edited after packaging (its content_sha256 does not match its fields); "
                "get an intact copy or package the model again",
            )
        present = set(self.names()) - {MANIFEST_RECORD}
        expected = set(manifest.record_sha256)
        problems = [f"{n} missing" for n in sorted(expected - present)]
        problems += [f"{n} added" for n in sorted(present - expected)]
        problems += [f"{n} changed" for n in sorted(expected & present)
                     if self.record_sha256(n) != manifest.record_sha256[n]]
        if problems:
            shown = ", ".join(problems[:10]) + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise DigestMismatch(
                self.label,
                f"content does not match the manifest's digests ({shown}): the archive was modified or damaged "
                "after packaging; get an intact copy or package the model again",
            )

    def check_entry(self, entry: str) -> None:
        """EntryPointMissing unless the pickle `entry` (e.g. "model/model.pkl") is in the archive."""
        if entry not in self:
            pickles = sorted(n for n in self.names() if n.endswith(".pkl"))
            raise EntryPointMissing(
                self.label, f"the entry point {entry!r} is not in the archive; pickles it holds: {pickles or 'none'}"
            )

    def check_externs(self, modules: list[str] | None = None) -> None:
        """ExternMissing if a module the archive takes from the environment cannot be imported here."""
        if modules is None:
            modules = self.manifest.extern_modules if self.has_manifest else self.extern_modules()
        # Top-level packages only: finding a submodule imports its parents (torch, transformers...), and some
        # (torch._C._nn) are attributes of a C module, not modules a finder knows.
        tops = sorted({name.split(".")[0] for name in modules})
        missing = [name for name in tops if name not in sys.modules and not _importable(name)]
        if missing:
            raise ExternMissing(
                self.label,
                f"needs module(s) {', '.join(missing)} from this environment (extern), but they cannot be imported "
                "here; install them, or package the model with them interned",
            )

    def check_requirements(self, *, strict: bool = False) -> None:
        """ExternMissing if a distribution the archive requires is not installed here; a RequirementWarning
        (a RequirementMismatch with `strict`) if one has another version than at packaging."""
        missing, changed = [], []
        for text in self.manifest.requirements:
            req = _dependencies.Requirement.parse(text)
            here = _dependencies.installed_version(req.distribution)
            if here is None:
                missing.append(str(req))
            elif here != req.version and req.distribution.lower() != "torch":  # torch: check_torch_version
                changed.append(f"{req.distribution} {here} is installed, {req.version} was packaged with")
        if missing:
            raise ExternMissing(
                self.label,
                f"needs {', '.join(missing)}, not installed here; install {'it' if len(missing) == 1 else 'them'}"
                f" (pip install {' '.join(repr(m) for m in missing)}) where the model is loaded",
            )
        if changed:
            message = (f"{'; '.join(changed)}. Outputs may differ: install the packaged versions, or package the "
                       "model again with these")
            if strict:
                raise RequirementMismatch(self.label, message)
            warnings.warn(RequirementWarning(f"{self.label}: {message}"), stacklevel=3)

    def check_torch_version(self) -> None:
        """A TorchVersionWarning if the archive was packaged with another torch major.minor than this one."""
        packaged, here = self.manifest.torch_version, _torch_version()
        if here is not None and _major_minor(packaged) != _major_minor(here):
            warnings.warn(
                TorchVersionWarning(
                    f"{self.label}: packaged with torch {packaged}, loaded with torch {here}; if loading fails or "
                    "outputs differ, package the model again with this torch"
                ),
                stacklevel=3,
            )

    def check_shared_writes(self, copy_weights: bool) -> None:
        """SharedWeightWrite if the model wrote into its weights when packaged and no private copy is asked."""
        manifest = self.manifest
        if manifest.writes_weights and not copy_weights:
            raise SharedWeightWrite(
                self.label,
                f"model {manifest.name!r} writes into its weights during inference (it changed "
                f"{', '.join(manifest.writes_weights[:5])} when it ran at packaging); weights loaded by tenfold "
                "are shared by every interpreter and read-only: load it with copy_weights=True",
            )

    def check_loadable(self, *, sha256: str | None = None, copy_weights: bool = False,
                       strict_requirements: bool = False) -> Manifest:
        """The checks made before every load: pin, manifest, torch version, requirements, weight writes, entry
        point and externs. Returns the manifest."""
        self.check_pin(sha256)
        manifest = self.manifest
        self.check_torch_version()
        self.check_requirements(strict=strict_requirements)
        self.check_shared_writes(copy_weights)
        self.check_entry(manifest.entry)
        self.check_externs()
        return manifest

    def verify(self, *, sha256: str | None = None) -> Manifest:
        """Every check that does not load the model, digests of every record included."""
        self.check_pin(sha256)
        self.check_digests()
        manifest = self.manifest
        self.check_entry(manifest.entry)
        self.check_requirements()
        self.check_externs()
        self.check_torch_version()
        return manifest


def open_archive(source: Source) -> Archive:
    """The archive at `source` (a path, memory-mapped read-only, or a bytes-like buffer), opened in place."""
    view, label = open_source(source)
    return Archive(view, label)


def archive_sha256(source: Source) -> str:
    """Hex sha256 of the archive's bytes: the value to pin with `sha256=`."""
    view, _ = open_source(source)
    return sha256_of(view)


def read_manifest(source: Source) -> Manifest:
    """The archive's manifest (reads manifest.json only; no digest is checked)."""
    return open_archive(source).manifest


def verify_archive(source: Source, *, sha256: str | None = None) -> Manifest:
    """Check the whole archive: zip structure, manifest, content digests, the `sha256` pin, entry point and
    externs. Returns the manifest; raises a PackageError subclass naming the file and the problem."""
    return open_archive(source).verify(sha256=sha256)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _torch_version() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    try:  # without importing it: a replica's host process never needs torch itself
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def sha256_of(view: memoryview) -> str:
    h = hashlib.sha256()
    step = 1 << 24
    for start in range(0, len(view), step):
        h.update(view[start : start + step])
    return h.hexdigest()
