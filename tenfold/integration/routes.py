"""The HTTP routes of a tenfold application, defined once for both ways in: Serve's route (through the
replica's host) and the data plane (`http_port`, served from inside the interpreters).

Nothing here imports Ray or Starlette: the interpreters' servers use it as the host does. Each check
raises a `codec.HTTPError` whose status and body are the answer.
"""

from __future__ import annotations

from collections.abc import Collection

from tenfold.runtime import BrokenInterpreterPool, InterpreterLost, RemoteError, remote_traceback

from . import codec

PREDICT = "/"
MANIFEST = "/-/manifest"
STATS = "/-/stats"
OPENAPI = "/-/openapi.json"
HEALTHZ = "/-/healthz"
#: The header that names the model of a request to an application of several (Serve's multiplexing header).
MODEL_HEADER = "serve_multiplexed_model_id"
_GETS = (MANIFEST, STATS, OPENAPI, HEALTHZ)
_ROUTES = "POST / to predict, GET /-/manifest, GET /-/stats, GET /-/openapi.json, GET /-/healthz"


class RequestTimeout(TimeoutError):
    """A call ran past `request_timeout_s` (answered 504 over HTTP)."""


def resolve(method: str, path: str, root_path: str = "", models: Collection[str] | None = None) -> tuple[str, str]:
    """The route a request is for (one of the constants above), and the model its path names ("" when none);
    404 or 405 for any other. `models`: the names of an application that serves several, whose models answer
    at /{name} (POST), /{name}/-/manifest and /{name}/-/openapi.json."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    path = "/" + path.strip("/")
    model = ""
    if models is not None and path != PREDICT and not path.startswith("/-/"):
        model, _, rest = path[1:].partition("/")
        if model not in models:
            raise model_not_found(model, models)
        path = "/" + rest
        if path not in (PREDICT, MANIFEST, OPENAPI):
            raise codec.HTTPError(f"no route /{model}{path}: POST /{model} to predict, GET /{model}/-/manifest, "
                                  f"GET /{model}/-/openapi.json", status=404, kind="NotFound")
    if path == PREDICT:
        if method != "POST":
            raise codec.HTTPError("POST inputs to /; GET /-/manifest for the signature", status=405,
                                  kind="MethodNotAllowed", headers={"Allow": "POST"})
        return PREDICT, model
    if path in _GETS:
        if method != "GET":
            raise codec.HTTPError(f"GET {path}", status=405, kind="MethodNotAllowed", headers={"Allow": "GET"})
        return path, model
    raise codec.HTTPError(f"no route {path}: {_ROUTES}", status=404, kind="NotFound")


def pick_model(route: str, by_path: str, by_header: str | None, models: Collection[str]) -> str:
    """The model a request to an application of several is for: named by its path (/{name}) or by Serve's
    multiplexing header (serve_multiplexed_model_id), "" for the application's own routes. 400 when the two
    disagree; 404 for a name not served, and for a prediction that names none."""
    if by_header and by_path and by_header != by_path:
        raise codec.MalformedRequest(f"the path names model {by_path!r}, but the {MODEL_HEADER} header names "
                                     f"{by_header!r}: name one")
    name = by_path or by_header or ""
    if name and name not in models:
        raise model_not_found(name, models)
    if not name and route == PREDICT:
        raise codec.ModelNotFound(f"this application serves several models: POST /{{name}}, or POST / with the "
                                  f"{MODEL_HEADER} header, for one of {_listed(models)}")
    return name if route in (PREDICT, MANIFEST, OPENAPI) else ""


def model_not_found(name: str, models: Collection[str]) -> codec.ModelNotFound:
    """The 404 for a model the application does not serve, naming those it does."""
    return codec.ModelNotFound(f"no model {name!r} here: this application serves {_listed(models)}")


def _listed(models: Collection[str], most: int = 20) -> str:
    names = sorted(models)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


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
