"""Exceptions of tenfold.runtime."""

from __future__ import annotations

from concurrent.futures import BrokenExecutor


class RuntimeFault(RuntimeError):
    """Base of the runtime's own errors."""


class PlatformNotSupported(RuntimeFault):
    """This process cannot host namespace interpreters (no glibc dlmopen, or no shared libpython)."""


class InterpreterStartError(RuntimeFault):
    """An interpreter could not be started; the message carries the reason."""


class BrokenInterpreterPool(BrokenExecutor):
    """The pool can no longer run work: an interpreter failed to start or was lost."""


class InterpreterLost(RuntimeFault):
    """An interpreter stopped answering (stuck in native code) and was taken out of service."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised inside an interpreter, kept as the `__cause__` of the exception
    the caller sees (as `concurrent.futures.ProcessPoolExecutor` does), so that it prints with it."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def remote_traceback(exc: BaseException) -> str | None:
    """The interpreter's traceback if `exc` was raised by `fn` inside an interpreter, else None."""
    if isinstance(exc, RemoteError):
        return exc.remote_traceback
    cause = exc.__cause__
    return cause.tb if isinstance(cause, RemoteTraceback) else None


class RemoteError(Exception):
    """`fn` raised an exception inside an interpreter that cannot be re-created in the caller (it does not
    pickle, or its class cannot be imported here). The message carries the remote type, message and
    traceback; an exception that can be re-created is raised as itself instead.
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str) -> None:
        super().__init__(f"{remote_type}: {remote_message}\n\nRemote traceback:\n{remote_traceback}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback))
