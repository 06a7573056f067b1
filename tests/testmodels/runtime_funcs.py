"""Functions the runtime tests run inside interpreters (they travel by module and name)."""

from __future__ import annotations

import ctypes
import importlib
import os
import platform
import sys
import threading
import time

counter = 0


def bump() -> int:
    global counter
    counter += 1
    return counter


def echo(x):
    return x


def where() -> tuple[int, int, int]:
    """(pid, thread ident, id of this interpreter's sys.modules)."""
    return os.getpid(), threading.get_ident(), id(sys.modules)


def slow_where(seconds: float) -> int:
    time.sleep(seconds)
    return threading.get_ident()


def fail(message: str) -> None:
    raise ValueError(message)


def unpicklable_result():
    return threading.Lock()


def spin() -> None:
    while True:
        pass


def numpy_address(a) -> tuple[int, bool]:
    return a.ctypes.data, a.flags.writeable


def torch_address(t) -> int:
    return t.data_ptr()


def arrow_address(arr) -> int:
    return arr.buffers()[1].address


def double_numpy(a):
    return a * 2


def double_tensor(t):
    return t * 2


def torch_threads() -> tuple[str | None, int]:
    import torch

    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


def has_module(name: str) -> bool:
    return name in sys.modules


def get_path() -> list[str]:
    return list(sys.path)


class Box:
    """A picklable, weak-referenceable argument."""

    def __init__(self, value: int) -> None:
        self.value = value


def unbox(box: Box) -> int:
    return box.value


def make_box(value: int) -> Box:
    return Box(value)


def _identity(x):
    return x


class Ephemeral:
    """Pickles as a tensor that exists only while it is being pickled."""

    def __reduce__(self):
        import torch

        return (_identity, (torch.arange(1000, dtype=torch.float32),))


def ephemeral_tensor() -> Ephemeral:
    return Ephemeral()


# -- holding an interpreter's GIL in native code ----------------------------------------------------

# poll() and ppoll() by machine: what /proc/<pid>/task/<tid>/syscall shows for a thread blocked in poll().
_POLL_SYSCALLS = {"x86_64": {"7", "271"}, "aarch64": {"73"}}


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


def hold_gil_in_poll(read_fd: int, timeout_ms: int, state_addr: int) -> bool:
    """Block in libc's poll() on `read_fd` for up to `timeout_ms`, called through a PyDLL handle, which
    keeps this interpreter's GIL for the whole call. Writes this thread's id to state[0] before, and 1 to
    state[1] after. True if a byte on `read_fd` ended the wait, False if the timeout did."""
    state = (ctypes.c_long * 2).from_address(state_addr)
    state[0] = threading.get_native_id()
    libc = ctypes.PyDLL("libc.so.6")  # PyDLL: the GIL is NOT released around the call
    fd = _PollFd(read_fd, 1, 0)  # POLLIN
    ready = libc.poll(ctypes.byref(fd), 1, timeout_ms)
    state[1] = 1
    if ready == 1:
        os.read(read_fd, 1)
    return ready == 1


def _in_poll(tid: int) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            number = f.read().split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return number in _POLL_SYSCALLS.get(platform.machine(), set())


def saw_holder_in_native_code(state_addr: int) -> bool:
    """Wait until the thread in `hold_gil_in_poll` is inside its poll() (True) or has returned (False)."""
    state = (ctypes.c_long * 2).from_address(state_addr)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state[0] and _in_poll(state[0]):
            return True
        if state[1]:
            return False
        time.sleep(0.001)
    raise TimeoutError("the holder neither entered poll() nor returned")


# -- keyword arguments, large payloads, tensors ----------------------------------------------------


def join(a, b="b", *, sep="-") -> str:
    return f"{a}{sep}{b}"


def tensor_seen_inside(t, write: bool) -> tuple[int, bool, bool, tuple[int, ...], list]:
    """(data_ptr, requires_grad, is_contiguous, stride, values) of `t` as this interpreter sees it; with
    `write`, adds 1 to it in place first (no autograd)."""
    import torch

    if write:
        with torch.no_grad():
            t.add_(1)
    return t.data_ptr(), t.requires_grad, t.is_contiguous(), tuple(t.stride()), t.detach().tolist()


def read_byte(fd: int) -> bytes:
    """Block in os.read until a byte arrives on `fd` (native code: an interrupt cannot land meanwhile)."""
    return os.read(fd, 1)


def load_module(name: str) -> None:
    importlib.import_module(name)


class HoldsALock(Exception):
    """An exception that cannot be pickled: it carries a lock."""


def fail_with_a_lock() -> None:
    raise HoldsALock("refused", threading.Lock())
