"""What crosses between the host and an interpreter: pickle protocol 5 with out-of-band buffers.

Both sides import this module. A call is described by a block of slots in host memory; large buffers
(numpy, pyarrow, contiguous CPU torch tensors) travel as (address, length) and are viewed, not copied,
on the other side while the call lasts.
"""

from __future__ import annotations

import copyreg
import ctypes
import importlib
import io
import pickle
import sys
import types
import weakref
from typing import Any

OP_CALL = 0
OP_RELEASE = 1

STATUS_OK = 0
STATUS_ERROR = 1
STATUS_NONE = 2  # set by the host before a call: still there afterwards means no answer was written


class BufferDesc(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("readonly", ctypes.c_int)]


# A call is a block of uint64 slots in host memory, read and written through a memoryview on both
# sides (indexing a memoryview is several times cheaper than a ctypes.Structure field). Small payloads
# and results are copied into two host-owned windows; larger ones travel by address.
(OP, STATUS, PAYLOAD, PAYLOAD_SIZE, BUFFERS, NBUFFERS, RESULT, RESULT_SIZE, RESULT_BUFFERS,
 NRESULT_BUFFERS, REQUEST_WINDOW, RESPONSE_WINDOW, WINDOW_SIZE, CALL_ID, RUNNING, INTERRUPTED) = range(16)
_SLOTS = 16
WINDOW_BYTES = 1 << 16


class CallBlock:
    """The host's side of a call block: slots plus the two windows, all host memory."""

    def __init__(self) -> None:
        self._block = (ctypes.c_uint64 * _SLOTS)()
        self._request = (ctypes.c_char * WINDOW_BYTES)()
        self._response = (ctypes.c_char * WINDOW_BYTES)()
        self.address = ctypes.addressof(self._block)
        self.slots = memoryview(self._block).cast("B").cast("Q")
        self.request = memoryview(self._request).cast("B")
        self.response = memoryview(self._response).cast("B")
        self.slots[REQUEST_WINDOW] = ctypes.addressof(self._request)
        self.slots[RESPONSE_WINDOW] = ctypes.addressof(self._response)
        self.slots[WINDOW_SIZE] = WINDOW_BYTES


class RemoteBlock:
    """The interpreter's view of a host call block."""

    def __init__(self, addr: int) -> None:
        self.slots = memoryview((ctypes.c_char * (8 * _SLOTS)).from_address(addr)).cast("B").cast("Q")
        size = self.slots[WINDOW_SIZE]
        self.request = memoryview((ctypes.c_char * size).from_address(self.slots[REQUEST_WINDOW])).cast("B")
        self.response = memoryview((ctypes.c_char * size).from_address(self.slots[RESPONSE_WINDOW])).cast("B")


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


class BufferAddresses:
    """Finds the address of a buffer through *this* interpreter's C API (never another copy's)."""

    def __init__(self, pythonapi: ctypes.PyDLL) -> None:
        self._get = pythonapi.PyObject_GetBuffer
        self._get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
        self._get.restype = ctypes.c_int
        self._release = pythonapi.PyBuffer_Release
        self._release.argtypes = [ctypes.POINTER(_PyBuffer)]
        self._release.restype = None

    def __call__(self, view: memoryview) -> int:
        buf = _PyBuffer()
        self._get(view, ctypes.byref(buf), 0)
        try:
            return buf.buf or 0
        finally:
            self._release(ctypes.byref(buf))


def _rebuild_tensor(buffer: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    import torch

    dt = getattr(torch, dtype)
    if len(buffer) == 0:
        return torch.empty(shape, dtype=dt)
    import warnings

    with warnings.catch_warnings():  # a read-only view gives a tensor that must not be written: that is the contract
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=dt).view(shape)


def _reduce_tensor(t: Any) -> Any:
    torch = sys.modules["torch"]
    if not _shareable(torch, t):
        return t.__reduce_ex__(5)
    nbytes = t.numel() * t.element_size()
    raw: Any = bytearray()
    if nbytes:
        raw = (ctypes.c_char * nbytes).from_address(t.data_ptr())
        raw._owner = t  # the view must keep the storage alive, even for a tensor made only to be pickled
    return _rebuild_tensor, (pickle.PickleBuffer(raw), str(t.dtype).split(".")[1], tuple(t.shape))


def _shareable(torch: Any, t: Any) -> bool:
    return (
        t.device.type == "cpu"
        and t.layout == torch.strided
        and not t.requires_grad
        and not t.is_quantized
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    )


class Encoder:
    """Pickles with protocol 5, large buffers out of band. One per thread: it is reused, not locked."""

    def __init__(self) -> None:
        self._buffers: list[pickle.PickleBuffer] = []
        self._pickler: pickle.Pickler | None = None
        self._out = io.BytesIO()

    def dumps(self, obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
        torch = sys.modules.get("torch")
        if torch is None:  # the plain C pickler is fastest; tensors need the dispatch entry below
            buffers: list[pickle.PickleBuffer] = []
            return pickle.dumps(obj, 5, buffer_callback=buffers.append), buffers
        if self._pickler is None:
            self._pickler = pickle.Pickler(self._out, 5, buffer_callback=self._buffers.append)
            self._pickler.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: _reduce_tensor}
        out, pickler = self._out, self._pickler
        out.seek(0)
        out.truncate()
        try:
            pickler.dump(obj)
            buffers = self._buffers[:]
        except BaseException:
            self._pickler = None  # a failed dump can leave the pickler's framing half done
            raise
        finally:
            self._buffers.clear()
            pickler.clear_memo()  # the memo holds every object it pickled: never past the call
        return out.getvalue(), buffers


# CPython keeps a bytes object's data inline, right after its header: the address without ctypes.cast.
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1


def bytes_address(data: bytes) -> int:
    """Address of the first byte of `data` (valid while `data` is alive)."""
    return id(data) + _BYTES_DATA_OFFSET


def loads(data: bytes, buffers: list[Any]) -> Any:
    return pickle.loads(data, buffers=buffers)


def describe(buffers: list[pickle.PickleBuffer], address: BufferAddresses) -> tuple[Any, list[memoryview]]:
    """A BufferDesc array for `buffers`, and the views that must stay alive while it is in use."""
    views = [b.raw() for b in buffers]
    descs = (BufferDesc * max(len(views), 1))()
    for i, v in enumerate(views):
        descs[i].addr = address(v) if v.nbytes else 0
        descs[i].size = v.nbytes
        descs[i].readonly = int(v.readonly)
    return descs, views


def view_buffers(addr: int, count: int) -> list[memoryview]:
    """Views over the other side's buffers: its memory, seen for the duration of the call."""
    if not count:
        return []
    descs = (BufferDesc * count).from_address(addr)
    views = []
    for d in descs:
        if not d.size:
            views.append(memoryview(b""))
            continue
        v = memoryview((ctypes.c_char * d.size).from_address(d.addr)).cast("B")
        views.append(v.toreadonly() if d.readonly else v)
    return views


def copy_buffers(addr: int, count: int) -> list[bytearray]:
    """Private copies of the other side's buffers, for results that outlive the call."""
    out: list[bytearray] = []
    if not count:
        return out
    for d in (BufferDesc * count).from_address(addr):
        ba = bytearray(d.size)
        if d.size:
            ctypes.memmove((ctypes.c_char * d.size).from_buffer(ba), d.addr, d.size)
        out.append(ba)
    return out


_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType)
_names: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()


def request(fn: Any, args: tuple, kwargs: dict) -> tuple:
    """What is pickled for a call. A function that can be found again by name travels as its name:
    much cheaper than pickling it as a global each time."""
    if type(fn) is types.FunctionType:
        name = _names.get(fn)
        if name is not None:
            return (name[0], name[1], args, kwargs)
    if type(fn) in _FUNCTION_TYPES:
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if module == "__main__":
            raise TypeError(
                f"{qualname} is defined in __main__, which interpreters cannot import: functions travel "
                "by module and name, so move it into an importable module"
            )
        if "<" in qualname:
            raise TypeError(
                f"{qualname} cannot travel to an interpreter: functions travel by module and name, so "
                "use a function defined at module level (not a lambda or a local function)"
            )
        if module:
            obj = sys.modules.get(module)
            for part in qualname.split("."):
                obj = getattr(obj, part, None)
            if obj is fn:
                if type(fn) is types.FunctionType:
                    _names[fn] = (module, qualname)
                return (module, qualname, args, kwargs)
    return (None, fn, args, kwargs)


_resolved: dict[tuple[str, str], Any] = {}


def unpack(req: tuple) -> tuple[Any, tuple, dict]:
    """(fn, args, kwargs) of a request, importing `fn` by name where it came by name (cached)."""
    module, fn, args, kwargs = req
    if module is not None:
        key = (module, fn)
        found = _resolved.get(key)
        if found is None:
            found = importlib.import_module(module)
            for part in fn.split("."):
                found = getattr(found, part)
            _resolved[key] = found
        fn = found
    return fn, args, kwargs
