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


class RemoteError(Exception):
    """`fn` raised inside an interpreter. The message carries the remote type, message and traceback.

    `remote_type`, `remote_message` and `remote_traceback` hold the parts; `exception` is the original
    exception object when it could be pickled back, else None.
    """

    def __init__(
        self, remote_type: str, remote_message: str, remote_traceback: str, exception: BaseException | None = None
    ) -> None:
        super().__init__(f"{remote_type}: {remote_message}\n\nRemote traceback:\n{remote_traceback}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.exception = exception

    def __reduce__(self):  # noqa: ANN204
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback, self.exception))
