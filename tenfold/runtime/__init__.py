"""tenfold.runtime: several isolated CPython interpreters in one process, behind an Executor."""

from .errors import (
    BrokenInterpreterPool,
    InterpreterLost,
    InterpreterStartError,
    PlatformNotSupported,
    RemoteError,
    RuntimeFault,
)
from .pool import InterpreterPool, interpreters_alive, usable_cores
from .stats import InterpreterStats, PoolStats

__all__ = [
    "BrokenInterpreterPool",
    "InterpreterLost",
    "InterpreterPool",
    "InterpreterStartError",
    "InterpreterStats",
    "PlatformNotSupported",
    "PoolStats",
    "RemoteError",
    "RuntimeFault",
    "interpreters_alive",
    "usable_cores",
]
