"""A torch.package zip seen in place: records are located in the source's bytes, never read into copies.

torch.package writes every record uncompressed (zip method 0) at a 64-byte-aligned offset, so a
record's bytes can be used where they lie: in a memory-mapped file or in a caller's buffer.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import struct
import zipfile
from typing import Any, Union

from .errors import NotAnArchive

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
    """The records of a torch.package zip, located in `view` (names without the archive's top folder)."""

    def __init__(self, view: memoryview, label: str) -> None:
        self.view = view
        self.label = label
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

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.view_of(name)).hexdigest()

    def storages(self) -> list[str]:
        return [n for n in self.records if n.startswith(".data/") and n.endswith(".storage")]

    def weight_bytes(self) -> int:
        return sum(self.records[n].size for n in self.storages())


def sha256_of(view: memoryview) -> str:
    h = hashlib.sha256()
    step = 1 << 24
    for start in range(0, len(view), step):
        h.update(view[start : start + step])
    return h.hexdigest()
