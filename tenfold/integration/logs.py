"""A replica's log: a caller's mistake in one line, an error of the model or of the replica with its traceback.

Serve's replica logs every exception a handle call's method raises as "Request failed." with its traceback
(`ray.serve._private.replica`, `_handle_errors_and_metrics`), on the "ray.serve" logger. For what HTTP answers
with a 4xx (`codec.InvalidInput` and the other `codec.HTTPError`s under 500) that traceback is a screenful of
Serve's and tenfold's own frames around a message that says it all, once per bad call: `install` puts a filter
on that logger that writes such a record as one warning line, with the status, kind and message. The caller still
gets the exception. Serve's route never reaches that code: `TenfoldModel` answers an HTTP request's errors itself.
"""

from __future__ import annotations

import logging

from . import codec

#: The logger of Serve's replica (`ray.serve._private.constants.SERVE_LOGGER_NAME`); tenfold's host code uses it too.
SERVE_LOGGER = "ray.serve"


class _ClientErrorsInOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, codec.HTTPError) or exc.status >= 500:
            return True
        # A RayTaskError wrapping one (a handle call this replica made itself) is an instance of the class it
        # wraps without having been through HTTPError.__init__: it keeps its record as it is.
        message = getattr(exc, "message", None)
        if not isinstance(message, str):
            return True
        message = message.replace("\n", "\\n")
        record.msg = f"{record.getMessage().rstrip('.')}: {exc.status} {exc.kind}: {message}"
        record.args = None
        record.exc_info = record.exc_text = None
        # The caller's mistake, not the replica's: where ERROR pages someone, a bad input should not.
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def install() -> None:
    """Write the caller's errors that Serve logs for this process's replica as one line each. Safe to call twice.

    On the logger, not its handlers: Serve replaces the handlers whenever it configures the replica's logging
    (a new `logging_config`), and keeps the logger's filters."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, _ClientErrorsInOneLine) for f in logger.filters):
        logger.addFilter(_ClientErrorsInOneLine())
