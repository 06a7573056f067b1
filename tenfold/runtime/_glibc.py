"""A private copy of libpython in its own glibc link-map namespace.

This is the only module in tenfold that talks to the dynamic loader. Everything in it exists because
stock CPython and stock wheels were never meant to be loaded twice into one process; each workaround
is labelled with the pitfall it answers, numbered as in docs/runtime-pitfalls.md (symptom, fix, and
the test that would catch its return):

1. pthread key indexes collide between libc copies  -> reserve a key block per namespace
2. RTLD_GLOBAL inside a namespace crashes glibc     -> patched out in the guest bootstrap
3. static TLS runs out after ~6 namespaces           -> GLIBC_TUNABLES check before starting
4. ctype tables are per thread and per libc copy     -> __ctype_init on every entering thread
5. threads that entered a namespace must not exit    -> one owner thread per interpreter, for life
6. one OpenMP pool per namespace                     -> thread budget set in the guest environment
16. each namespace's malloc keeps what a large call freed -> bound_free_heap at start, release_free_heap
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import sysconfig
import threading
from collections.abc import Mapping
from typing import Any

from .errors import InterpreterStartError, PlatformNotSupported

#: glibc allows 16 link-map namespaces per process; the base namespace is one of them.
MAX_NAMESPACES = 15

#: Bytes of optional static TLS one interpreter with torch imported consumes (libc, libgomp, libtorch
#: each bring initial-exec TLS into every namespace). Measured: 4,096 bytes each leaves headroom.
STATIC_TLS_PER_INTERPRETER = 4096
TUNABLE = "glibc.rtld.optional_static_tls"

#: The GLIBC_TUNABLES value a process that hosts interpreters needs from its start (pitfall 3): static TLS
#: for every namespace glibc allows. `./dev` and the `tenfold` command set it; tests check they agree.
GLIBC_TUNABLES = f"{TUNABLE}={STATIC_TLS_PER_INTERPRETER * 16}"

_LM_ID_NEWLM = -1
_RTLD_NOW = 0x2
_RTLD_LOCAL = 0x0
# Pitfall 1: size of the pthread-key block each namespace's libc may allocate from. Blocks are aligned
# to glibc's second-level key arrays (32 keys each) so that no array is shared by two libc copies.
_KEY_BLOCK = 64
_KEY_LEVEL2 = 32
_PTHREAD_KEYS_MAX = 1024

_loader_lock = threading.Lock()


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.dlmopen.restype = ctypes.c_void_p
    libc.dlmopen.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_int]
    libc.dlsym.restype = ctypes.c_void_p
    libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    libc.dlerror.restype = ctypes.c_char_p
    libc.pthread_key_create.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
    libc.pthread_key_delete.argtypes = [ctypes.c_uint]
    libc.pthread_setspecific.argtypes = [ctypes.c_uint, ctypes.c_void_p]
    return libc


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _heap_libc() -> ctypes.CDLL:
    # Loaded from inside an interpreter, "libc.so.6" is that namespace's own libc copy, with its own malloc.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _MallInfo2
    return libc


#: What a malloc may keep at the top of each of its heaps before it gives it back (pitfall 16).
HEAP_KEEP_BYTES = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def bound_free_heap(keep_bytes: int = HEAP_KEEP_BYTES) -> None:
    """Fix the calling namespace's malloc thresholds (pitfall 16): allocations of `keep_bytes` or more are mapped
    and unmapped on their own, and a heap whose free top passes `keep_bytes` gives it back on free. glibc's
    default raises both after each large free, so that a thread's heap kept what one large request freed."""
    libc = _heap_libc()
    libc.mallopt(_M_MMAP_THRESHOLD, keep_bytes)
    libc.mallopt(_M_TRIM_THRESHOLD, keep_bytes)


def release_free_heap(min_free_bytes: int = 16 << 20) -> int:
    """Give the free memory of the calling namespace's malloc back to the system when it holds at least
    `min_free_bytes` free (pitfall 16). Returns the bytes its heap has in use (0 where glibc cannot say)."""
    libc = _heap_libc()
    if not hasattr(libc, "mallinfo2"):
        libc.malloc_trim(0)
        return 0
    info = libc.mallinfo2()
    if info.fordblks + info.fsmblks >= min_free_bytes:
        libc.malloc_trim(0)
    return int(info.uordblks + info.hblkhd)


@functools.cache
def libpython_path() -> str:
    """Path of the host's shared libpython; raises PlatformNotSupported where there is none."""
    with _loader_lock:  # sysconfig fills its cache lazily, and not thread-safely
        return _find_libpython()


def _find_libpython() -> str:
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise PlatformNotSupported(
            f"this Python ({sys.executable}) has no shared libpython: it was built without "
            "--enable-shared. Use a Python built with it (pyenv: "
            "PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install <version>; Debian's python3 has it), "
            "or pass backend='threads'"
        )
    path = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
    if not os.path.exists(path):
        raise PlatformNotSupported(f"shared libpython not found at {path}; pass backend='threads'")
    return path


def check_platform() -> None:
    """Raise PlatformNotSupported unless this process can host namespace interpreters."""
    if not sys.platform.startswith("linux"):
        raise PlatformNotSupported(f"namespace interpreters need glibc's dlmopen; {sys.platform} has none")
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.dlmopen  # noqa: B018 - glibc >= 2.34 exports it from libc itself
    except (OSError, AttributeError) as exc:
        raise PlatformNotSupported(f"namespace interpreters need glibc >= 2.34 with dlmopen: {exc}") from None
    libpython_path()


def startup_tunables() -> str | None:
    """GLIBC_TUNABLES as the process had it at start (glibc reads it only then, pitfall 3)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return os.environ.get("GLIBC_TUNABLES")
    for entry in entries:
        if entry.startswith(b"GLIBC_TUNABLES="):
            return entry.split(b"=", 1)[1].decode(errors="replace")
    return None


def reserved_static_tls() -> int:
    """Bytes of optional static TLS reserved at process start (0 when the tunable is not set)."""
    value = startup_tunables()
    if not value:
        return 0
    for item in value.split(":"):
        name, _, number = item.partition("=")
        if name == TUNABLE:
            try:
                return int(number, 0)
            except ValueError:
                return 0
    return 0


def static_tls_ready() -> bool:
    """True if this process reserved static TLS for every namespace glibc allows."""
    return reserved_static_tls() >= STATIC_TLS_PER_INTERPRETER * MAX_NAMESPACES


def with_glibc_tunables(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` for a child process that will host interpreters: GLIBC_TUNABLES reserves the
    static TLS they need (added to any tunables already there)."""
    out = dict(env)
    current = out.get("GLIBC_TUNABLES", "")
    if TUNABLE not in current:
        out["GLIBC_TUNABLES"] = f"{current}:{GLIBC_TUNABLES}" if current else GLIBC_TUNABLES
    return out


def check_capacity(wanted: int, alive: int) -> None:
    """Raise ValueError if `wanted` more namespaces (with `alive` already running) cannot be hosted."""
    if alive + wanted > MAX_NAMESPACES:
        raise ValueError(
            f"cannot start {wanted} interpreter(s): {alive} are already alive in this process and glibc "
            f"allows at most {MAX_NAMESPACES} (16 link-map namespaces, one of them the host's)"
        )
    reserved = reserved_static_tls()
    needed = (alive + wanted) * STATIC_TLS_PER_INTERPRETER
    if reserved < needed:
        have = f"reserves only {reserved} bytes of" if reserved else "does not reserve"
        raise ValueError(
            f"GLIBC_TUNABLES {have} optional static TLS ({TUNABLE}), but {alive + wanted} interpreter(s) "
            f"need {needed} bytes. Set GLIBC_TUNABLES={GLIBC_TUNABLES} in the environment before the "
            "process starts (glibc reads it only at start-up): export it in the shell, pass it in Ray's "
            "runtime_env env_vars, or run through the `tenfold` command, which sets it and re-executes"
        )


class _HostKeys:
    """Pitfall 1: pthread key indexes handed out to namespaces, reserved in the host's libc."""

    def __init__(self) -> None:
        self._libc = _libc()
        self._free_blocks: list[int] = []

    def reserve_block(self) -> int:
        if self._free_blocks:
            return self._free_blocks.pop()
        created: list[int] = []
        key = ctypes.c_uint()
        start = None
        while start is None:
            if self._libc.pthread_key_create(ctypes.byref(key), None) != 0:
                for k in created:
                    self._libc.pthread_key_delete(k)
                raise InterpreterStartError("out of pthread keys while reserving a block for an interpreter")
            created.append(key.value)
            run = [k for k in created if k >= key.value - _KEY_BLOCK + 1]
            first = key.value - _KEY_BLOCK + 1
            if first % _KEY_LEVEL2 == 0 and len(run) == _KEY_BLOCK and run == list(range(first, key.value + 1)):
                start = first
        for k in created:  # give back the host keys below the block; the host may use them again
            if k < start:
                self._libc.pthread_key_delete(k)
        return start

    def pretouch(self, start: int) -> None:
        """Pitfall 5: let the host libc allocate this thread's second-level key arrays for the block."""
        for k in range(max(start, _KEY_LEVEL2), start + _KEY_BLOCK, _KEY_LEVEL2):
            self._libc.pthread_setspecific(k, ctypes.c_void_p(1))
            self._libc.pthread_setspecific(k, None)


_host_keys: _HostKeys | None = None


class Namespace:
    """A private libpython loaded with dlmopen into a new link-map namespace, not yet initialised."""

    def __init__(self) -> None:
        global _host_keys
        path = libpython_path().encode()
        libc = _libc()
        with _loader_lock:
            if _host_keys is None:
                _host_keys = _HostKeys()
            self.key_block = _host_keys.reserve_block()
            handle = libc.dlmopen(_LM_ID_NEWLM, path, _RTLD_NOW | _RTLD_LOCAL)
            if not handle:
                err = libc.dlerror()
                raise InterpreterStartError(f"dlmopen({path.decode()}) failed: {err.decode() if err else '?'}")
            self.handle = handle
            self._dlsym = libc.dlsym
            self._burn_keys()

    def sym(self, name: str, restype: Any = None, argtypes: tuple[Any, ...] = ()) -> Any:
        """A C function of this namespace (libpython or its libc), callable from any host thread."""
        addr = self._dlsym(self.handle, name.encode())
        if not addr:
            raise InterpreterStartError(f"symbol {name} not found in the namespace's libpython")
        return ctypes.CFUNCTYPE(restype, *argtypes)(addr)

    def address(self, name: str) -> int:
        addr = self._dlsym(self.handle, name.encode())
        if not addr:
            raise InterpreterStartError(f"symbol {name} not found in the namespace's libpython")
        return addr

    def _burn_keys(self) -> None:
        # Pitfall 1: the namespace's libc starts its key table at 0. Take every index below our block in
        # *its* table, so the keys it creates from now on fall inside the block the host reserved.
        create = self.sym("pthread_key_create", ctypes.c_int, (ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p))
        key = ctypes.c_uint()
        while True:
            if create(ctypes.byref(key), None) != 0:
                raise InterpreterStartError("namespace libc ran out of pthread keys")
            if key.value >= self.key_block - 1:
                break
        if key.value >= self.key_block and self.key_block:
            raise InterpreterStartError(f"namespace libc handed out key {key.value} past its block {self.key_block}")

    def enter_thread(self) -> None:
        """Make the calling host thread able to run code in this namespace (pitfalls 4 and 5)."""
        self.sym("__ctype_init")()
        assert _host_keys is not None
        _host_keys.pretouch(self.key_block)

