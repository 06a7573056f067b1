"""The HTTP routes of a tenfold application, defined once for both ways in: Serve's route (through the
replica's host) and the data plane (`http_port`, served from inside the interpreters).

Nothing here imports Ray or Starlette: the interpreters' servers use it as the host does. Each check
raises a `codec.HTTPError` whose status and body are the answer.
"""

from __future__ import annotations

from tenfold.runtime import BrokenInterpreterPool, InterpreterLost, RemoteError, remote_traceback

from . import codec

PREDICT = "/"
MANIFEST = "/-/manifest"
STATS = "/-/stats"
OPENAPI = "/-/openapi.json"
HEALTHZ = "/-/healthz"
_GETS = (MANIFEST, STATS, OPENAPI, HEALTHZ)
_ROUTES = "POST / to predict, GET /-/manifest, GET /-/stats, GET /-/openapi.json, GET /-/healthz"


class RequestTimeout(TimeoutError):
    """A call ran past `request_timeout_s` (answered 504 over HTTP)."""


def resolve(method: str, path: str, root_path: str = "") -> str:
    """The route a request is for (one of the constants above); 404 or 405 for any other."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    path = "/" + path.strip("/")
    if path == PREDICT:
        if method != "POST":
            raise codec.HTTPError("POST inputs to /; GET /-/manifest for the signature", status=405,
                                  kind="MethodNotAllowed", headers={"Allow": "POST"})
        return PREDICT
    if path in _GETS:
        if method != "GET":
            raise codec.HTTPError(f"GET {path}", status=405, kind="MethodNotAllowed", headers={"Allow": "GET"})
        return path
    raise codec.HTTPError(f"no route {path}: {_ROUTES}", status=404, kind="NotFound")


def media_type(content_type: str | None, interface: codec.Interface) -> str:
    """The request body's media type, JSON when none is given; 415 for one the model is not served in."""
    media = (content_type or codec.JSON_TYPE).split(";")[0].strip().lower()
    if media not in (codec.JSON_TYPE, codec.ARROW_TYPE):
        raise codec.UnsupportedMediaType(
            f"Content-Type {media!r} is not served; send {codec.JSON_TYPE} or {codec.ARROW_TYPE}")
    if media == codec.ARROW_TYPE and interface.takes_values:
        raise codec.UnsupportedMediaType(
            f"this model takes Python values {interface.signature}: send {codec.JSON_TYPE}")
    return media


def wants_events(accept: str | None) -> bool:
    """Whether a streaming request asks for server-sent events (Accept: text/event-stream) rather than
    newline-delimited JSON."""
    return accept is not None and codec.EVENT_STREAM_TYPE in accept.lower()


def check_declared_length(content_length: str | None, limit: int) -> None:
    """413 for a declared body over `limit` bytes, before any of it is read; 400 for a Content-Length
    that is not a number."""
    if content_length is None:
        return
    try:
        size = int(content_length)
    except ValueError:
        raise codec.MalformedRequest(f"Content-Length {content_length!r} is not a number") from None
    if size > limit:
        raise codec.PayloadTooLarge(f"the body has {size} bytes, over max_request_bytes ({limit})")


def too_large(limit: int) -> codec.HTTPError:
    """The 413 for a body found to exceed `limit` bytes while it is read."""
    return codec.PayloadTooLarge(f"the body is over max_request_bytes ({limit})")


def timed_out(timeout_s: float) -> RequestTimeout:
    return RequestTimeout(f"the call took longer than request_timeout_s ({timeout_s:g} s)")


def overloaded(retry_after_s: float) -> codec.HTTPError:
    """The 503 past max_queued_requests, telling the caller when to come back."""
    return codec.HTTPError("this replica has more requests than max_ongoing_requests + max_queued_requests; "
                           "retry later", status=503, kind="Overloaded",
                           headers={"Retry-After": f"{max(1, round(retry_after_s))}"})


def model_error(exc: BaseException) -> codec.HTTPError:
    """The 500 for an exception the model raised: its type and message."""
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    return codec.HTTPError(f"{kind}: {exc}", status=500, kind="ModelError")


def classify(exc: BaseException) -> codec.HTTPError:
    """The HTTP answer for an exception raised while serving a request through the replica's host."""
    if isinstance(exc, codec.HTTPError):
        return exc
    if isinstance(exc, RequestTimeout):
        return codec.HTTPError(str(exc), status=504, kind="Timeout")
    if isinstance(exc, RemoteError):  # raised in an interpreter, of a type that cannot be re-created here
        return codec.HTTPError(f"{exc.remote_type}: {exc.remote_message}", status=500, kind="ModelError")
    if remote_traceback(exc) is not None:  # raised by the model (or its code) inside an interpreter
        return model_error(exc)
    if isinstance(exc, BrokenInterpreterPool | InterpreterLost):
        return codec.HTTPError(f"this replica cannot serve: {exc}", status=503, kind="Unavailable",
                               headers={"Retry-After": "1"})
    return codec.HTTPError(f"{type(exc).__name__}: {exc}", status=500, kind="InternalError")
