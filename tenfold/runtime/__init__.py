"""tenfold.runtime: several isolated CPython interpreters in one process, behind an Executor."""

from ._glibc import GLIBC_TUNABLES, bound_free_heap, release_free_heap, static_tls_ready, with_glibc_tunables
from ._glibc import MAX_NAMESPACES as MAX_INTERPRETERS
from ._guest import raise_in_thread
from .errors import (
    BrokenInterpreterPool,
    InterpreterLost,
    InterpreterStartError,
    PlatformNotSupported,
    RemoteError,
    RemoteTraceback,
    RuntimeFault,
    remote_traceback,
)
from .pool import InterpreterPool, interpreters_alive, interpreters_parked, usable_cores
from .stats import InterpreterStats, MemoryInUse, PoolStats, release_and_measure

__all__ = [
    "GLIBC_TUNABLES",
    "BrokenInterpreterPool",
    "InterpreterLost",
    "InterpreterPool",
    "InterpreterStartError",
    "InterpreterStats",
    "MAX_INTERPRETERS",
    "MemoryInUse",
    "PlatformNotSupported",
    "PoolStats",
    "RemoteError",
    "RemoteTraceback",
    "RuntimeFault",
    "bound_free_heap",
    "interpreters_alive",
    "interpreters_parked",
    "raise_in_thread",
    "release_and_measure",
    "release_free_heap",
    "remote_traceback",
    "static_tls_ready",
    "usable_cores",
    "with_glibc_tunables",
]
