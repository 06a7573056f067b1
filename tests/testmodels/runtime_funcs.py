"""Functions the runtime tests run inside interpreters (they travel by module and name)."""

from __future__ import annotations

import os
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
