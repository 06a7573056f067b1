"""Where an archive's bytes come from: a local file, S3 (or an S3-compatible store), or HTTP(S).

`ArchiveSource.parse` reads the `archive:` string of a config; `fetch` reads the whole archive from
its source, hashing as it streams, and refuses any bytes whose sha256 is not the pinned one. An
archive runs pickled code when loaded, so every source but a local file must be pinned
(`check_pinned`): bytes that cross a network, or sit in a bucket others can write to, are only
trusted by their digest.

Secrets never reach a message or a log record: credentials are read from the environment when a
fetch starts and are never stored in an `ArchiveSource`; `str()` and `repr()` of a source drop a
URL's user and password and its query (where presigned URLs carry their signature).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mmap
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from typing import Any, Literal

from tenfold.packaging import PinMismatch

__all__ = ["ArchiveSource", "ArchiveUnavailable", "DEFAULT_TIMEOUT_S", "check_pinned", "fetch", "fetch_with_digest",
           "requires_pin"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
ACCEPTED_FORMS = (
    "a local path (a relative one is taken from the current directory of the process that builds the "
    "application), file:///absolute/path, s3://bucket/key "
    "(with endpoint_url for an S3-compatible store) or http(s)://host/path"
)
_PIN_HELP = (
    "get the digest of a copy you trust with `tenfold inspect LOCAL_COPY` (its sha256 line) or "
    "`sha256sum LOCAL_COPY`, and set sha256 to it"
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A URI is a scheme followed by "://"; anything else (even "a:b.pt") is a local path.
_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):(?P<rest>.*)", re.DOTALL)
_SCHEMES = ("file", "s3", "http", "https")
# Each read of an S3 object is one ranged GET: large reads keep the requests few.
_S3_CHUNK = 16 << 20
_HTTP_CHUNK = 1 << 20
_HASH_CHUNK = 16 << 20

Scheme = Literal["file", "s3", "http", "https"]


class ArchiveUnavailable(ValueError):
    """The archive's bytes could not be read from its source; the message names the source (without
    secrets), the reason, and what to do."""

    def __init__(self, source: ArchiveSource, reason: str) -> None:
        super().__init__(f"cannot fetch archive {source.describe()}: {reason}")
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:  # crosses from a replica to the caller intact
        return (_rebuild_unavailable, (self.source, str(self)))


def _rebuild_unavailable(source: ArchiveSource, message: str) -> ArchiveUnavailable:
    exc = ArchiveUnavailable.__new__(ArchiveUnavailable)
    ValueError.__init__(exc, message)
    exc.source = source
    return exc


@dataclass(frozen=True, repr=False)
class ArchiveSource:
    """Where an archive is. `location` is, by `scheme`:

    - "file": an absolute path on this machine;
    - "s3": "bucket/key", read from `endpoint_url` (an S3-compatible store) or else from AWS S3;
    - "http"/"https": the URL as given, user info and query included (they may be the credentials).

    Build one with `ArchiveSource.parse`. Credentials are not part of a source: S3's come from the
    environment of the process that fetches.
    """

    scheme: Scheme
    location: str
    endpoint_url: str | None = None
    #: A relative path as the config gave it, and the directory it was parsed in (where `location` lies).
    relative: tuple[str, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.scheme not in _SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(_SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "file" and not os.path.isabs(self.location):
            raise ValueError(f"a file source needs an absolute path, got {self.location!r}")
        if self.scheme == "s3":
            bucket, _, key = self.location.partition("/")
            if not bucket or not key:
                raise ValueError(f"an s3 source needs 'bucket/key', got {self.location!r}")
        if self.endpoint_url is not None:
            if self.scheme != "s3":
                raise ValueError(f"endpoint_url applies to s3:// archives only, not to {self.describe()}")
            _check_endpoint(self.endpoint_url)

    @classmethod
    def parse(cls, archive: str, *, endpoint_url: str | None = None) -> ArchiveSource:
        """The source named by a config's `archive:` string.

        A relative path is resolved against the current directory now, so the source means the same
        file wherever it is later used. For s3://, `endpoint_url` defaults to the environment's
        AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (else AWS S3 itself). Raises ValueError naming the
        accepted forms for anything else.
        """
        text = archive.strip()
        if not text:
            raise ValueError(f"archive is empty; give {ACCEPTED_FORMS}")
        match = _URI.fullmatch(text)
        scheme = match["scheme"].lower() if match else ""
        if not match or (scheme not in _SCHEMES and not match["rest"].startswith("//")):
            if endpoint_url is not None:
                raise ValueError(f"endpoint_url applies to s3:// archives only, not to the local path {archive!r}")
            path = Path(text).expanduser()
            return cls("file", str(path.absolute()), relative=None if path.is_absolute() else (text, os.getcwd()))
        if scheme == "file":
            return cls("file", _file_uri_path(text))
        if scheme == "s3":
            if not match["rest"].startswith("//"):
                raise ValueError(f"archive {archive!r} is not a valid S3 URI; write s3://bucket/key")
            # S3 keys are taken literally: '?', '#' and '%' are ordinary characters in a key.
            location = match["rest"][2:]
            bucket, _, key = location.partition("/")
            if not bucket or not key:
                raise ValueError(f"archive {archive!r} names no object; write s3://bucket/key")
            endpoint, origin = endpoint_url or None, "endpoint_url"
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
                if endpoint is None and os.environ.get(name):
                    endpoint, origin = os.environ[name], name
            if endpoint is not None:
                _check_endpoint(endpoint, origin)
            return cls("s3", location, endpoint)
        if scheme in ("http", "https"):
            if endpoint_url is not None:
                raise ValueError(f"endpoint_url applies to s3:// archives only, not to {_safe_url(text)}")
            if not urllib.parse.urlsplit(text).hostname:
                raise ValueError(f"archive URL {_safe_url(text)} has no host; write {scheme}://host/path")
            return cls("http" if scheme == "http" else "https", text)
        raise ValueError(f"archive {_safe_url(text)} has an unsupported scheme {scheme}://; give {ACCEPTED_FORMS}")

    @property
    def is_local(self) -> bool:
        """True for a file on this machine (a path or a file:// URI)."""
        return self.scheme == "file"

    def describe(self) -> str:
        """The source as it is safe to log: no credentials, no user info, no query."""
        if self.scheme == "file":
            return self.location
        if self.scheme == "s3":
            where = f" at {_safe_url(self.endpoint_url)}" if self.endpoint_url else ""
            return f"s3://{self.location}{where}"
        return _safe_url(self.location)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return f"ArchiveSource({self.describe()!r})"


def requires_pin(source: ArchiveSource) -> bool:
    """Whether `source` may be fetched only with a sha256 pin: every source but a local file."""
    return not source.is_local


def check_pinned(source: ArchiveSource, sha256: str | None) -> None:
    """ValueError if `source` needs a pin (see `requires_pin`) and `sha256` is None; the message says how
    to get the digest."""
    if sha256 is None and requires_pin(source):
        raise ValueError(
            f"sha256 must be set when archive is {source.describe()}: an archive from {source.scheme}:// is loaded "
            f"as pickled code and trusted only by its digest; {_PIN_HELP}"
        )


def fetch(
    source: ArchiveSource,
    *,
    sha256: str | None,
    max_bytes: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> memoryview:
    """The whole archive at `source`, its sha256 checked against `sha256` as it is read.

    Returns a read-only, one-dimensional memoryview of bytes (format "B"): `numpy.frombuffer(view,
    dtype=numpy.uint8)`, `ray.put` of that array and `tenfold.packaging.open_archive(view)` use it
    without a copy. A local file is memory-mapped (its pages are shared with the page cache; do not
    rewrite the file while the view is in use); a remote archive is read into memory once.

    `sha256` is required for every source but a local file (ValueError otherwise). `max_bytes` refuses
    a larger archive before it is read. `timeout_s` bounds each wait: for a connection, and for the
    next bytes of an answer (not the whole transfer, so a large archive on a slow link still arrives).

    Raises `ArchiveUnavailable` when the bytes cannot be read (no such file or object, an HTTP error
    status, a refused connection, a timeout, access denied, too large) and
    `tenfold.packaging.PinMismatch` when they are not the pinned ones.
    """
    return fetch_with_digest(source, sha256=sha256, max_bytes=max_bytes, timeout_s=timeout_s)[0]


def fetch_with_digest(
    source: ArchiveSource,
    *,
    sha256: str | None,
    max_bytes: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[memoryview, str]:
    """`fetch`, and the archive's hex sha256 as computed while it was read (the value to pin)."""
    check_pinned(source, sha256)
    expected = _normal_sha256(sha256) if sha256 is not None else None
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    logger.info("fetching archive %s", source)
    started = time.monotonic()
    hasher = hashlib.sha256()
    if source.scheme == "file":
        view = _fetch_file(source, hasher, max_bytes)
    elif source.scheme == "s3":
        view = _fetch_s3(source, hasher, max_bytes, timeout_s)
    else:
        view = _fetch_http(source, hasher, max_bytes, timeout_s)
    actual = hasher.hexdigest()
    if expected is not None and actual != expected:
        raise PinMismatch(
            source.describe(),
            f"sha256 is {actual}, but {expected} was pinned: this is not the archive you pinned. Fix the source, "
            "or pin the new digest if the change is intended",
        )
    logger.info("fetched archive %s: %d bytes in %.2f s, sha256 %s", source, len(view),
                time.monotonic() - started, actual)
    return view, actual


# -- local files -----------------------------------------------------------------------------------


def _fetch_file(source: ArchiveSource, hasher: Any, max_bytes: int | None) -> memoryview:
    try:
        with open(source.location, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _check_size(source, size, max_bytes)
            if size == 0:  # mmap refuses an empty file; the archive reader says what is wrong with it
                return memoryview(b"")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        where = ""
        if source.relative is not None:
            where = (f" (the relative path {source.relative[0]!r} was taken from {source.relative[1]}, the "
                     "current directory of the process that built the application: for `serve run` and "
                     "`serve deploy` that is where the Ray cluster was started, not the config file's directory; "
                     "give an absolute path to be sure)")
        raise ArchiveUnavailable(
            source, f"no such file{where}; package a model with `tenfold package` first, or correct the path"
        ) from None
    except IsADirectoryError:
        raise ArchiveUnavailable(source, "it is a directory; name the archive file inside it") from None
    except PermissionError:
        raise ArchiveUnavailable(source, "permission denied; make the file readable by this user") from None
    view = memoryview(mapped)
    for start in range(0, size, _HASH_CHUNK):
        hasher.update(view[start : start + _HASH_CHUNK])
    return view


# -- S3 --------------------------------------------------------------------------------------------


def _fetch_s3(source: ArchiveSource, hasher: Any, max_bytes: int | None, timeout_s: float) -> memoryview:
    from pyarrow import fs  # only a fetch from S3 needs pyarrow's S3 support loaded

    filesystem = _s3_filesystem(source, timeout_s)
    try:
        info = filesystem.get_file_info(source.location)
    except OSError as exc:
        raise ArchiveUnavailable(source, _s3_reason(source, exc)) from None
    if info.type == fs.FileType.NotFound:
        bucket = source.location.partition("/")[0]
        raise ArchiveUnavailable(
            source, f"no such object (or no bucket {bucket!r}); check the bucket and key, e.g. with "
            f"`aws s3 ls s3://{source.location}`, and that the endpoint is the store that holds it"
        )
    if info.type != fs.FileType.File:
        raise ArchiveUnavailable(source, "it is a prefix (a folder), not an object; name the archive's key")
    size = int(info.size)
    _check_size(source, size, max_bytes)
    data = bytearray(size)
    view = memoryview(data)
    done = 0
    try:
        with filesystem.open_input_stream(source.location) as stream:
            while done < size:
                n = stream.readinto(view[done : min(size, done + _S3_CHUNK)])
                if n == 0:
                    break
                hasher.update(view[done : done + n])
                done += n
    except OSError as exc:
        raise ArchiveUnavailable(source, _s3_reason(source, exc)) from None
    if done != size:
        raise ArchiveUnavailable(source, f"the transfer ended after {done} of {size} bytes; retry")
    return view.toreadonly()


def _s3_filesystem(source: ArchiveSource, timeout_s: float) -> Any:
    from pyarrow import fs

    env = os.environ
    options: dict[str, Any] = {"connect_timeout": timeout_s, "request_timeout": timeout_s}
    # Keys from the environment when present; otherwise the AWS SDK's own chain (~/.aws, the node's role).
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        options["access_key"] = env["AWS_ACCESS_KEY_ID"]
        options["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        options["session_token"] = env.get("AWS_SESSION_TOKEN") or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if source.endpoint_url:
        parts = urllib.parse.urlsplit(source.endpoint_url)
        options["endpoint_override"] = parts.netloc
        options["scheme"] = parts.scheme
        # S3-compatible stores sign with us-east-1 unless told otherwise; without a region the SDK
        # would first probe EC2 instance metadata for one.
        region = region or "us-east-1"
    if region:
        options["region"] = region
    return fs.S3FileSystem(**options)


def _s3_reason(source: ArchiveSource, exc: OSError) -> str:
    detail = _scrub(str(exc))
    where = "the endpoint_url (or AWS_ENDPOINT_URL)" if source.endpoint_url else "the network path to AWS S3"
    if "ACCESS_DENIED" in detail or "INVALID_ACCESS_KEY" in detail or "SIGNATURE" in detail or "403" in detail:
        return (
            f"access denied ({detail}); check the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_SESSION_TOKEN (or the node's role) and that they may read this object"
        )
    if "NETWORK_CONNECTION" in detail or "curlCode" in detail:
        return f"cannot reach the store ({detail}); check {where} and that the store is up"
    return f"S3 error ({detail}); check the bucket, the key and {where}"


def _scrub(text: str) -> str:
    """`text` with any credential of the environment blanked out (the SDK's messages should hold none;
    this makes sure)."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


# -- HTTP(S) ---------------------------------------------------------------------------------------


def _fetch_http(source: ArchiveSource, hasher: Any, max_bytes: int | None, timeout_s: float) -> memoryview:
    url, authorization = _split_userinfo(source.location)
    # Identity encoding: the digest is of the archive's bytes, not of a compressed transfer.
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity", "User-Agent": "tenfold"})
    if authorization is not None:
        # Unredirected: a redirect to another host must not carry the password there.
        request.add_unredirected_header("Authorization", authorization)
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ArchiveUnavailable(source, _http_status_reason(exc.code, exc.reason)) from None
    except urllib.error.URLError as exc:
        raise ArchiveUnavailable(source, _network_reason(exc.reason, timeout_s)) from None
    except (OSError, HTTPException) as exc:
        raise ArchiveUnavailable(source, _network_reason(exc, timeout_s)) from None
    with response:
        if response.status != 200:
            raise ArchiveUnavailable(source, _http_status_reason(response.status, response.reason))
        length = response.headers.get("Content-Length")
        size = int(length) if length is not None and length.isdigit() else None
        if size is not None:
            _check_size(source, size, max_bytes)
        try:
            data = _read_known(response, size, hasher) if size is not None else _read_unknown(
                source, response, max_bytes, hasher
            )
        except IncompleteRead:
            raise ArchiveUnavailable(source, "the transfer ended before the whole archive arrived; retry") from None
        except (OSError, HTTPException) as exc:
            raise ArchiveUnavailable(source, _network_reason(exc, timeout_s)) from None
    if size is not None and len(data) != size:
        raise ArchiveUnavailable(source, f"the transfer ended after {len(data)} of {size} bytes; retry")
    return memoryview(data).toreadonly()


def _read_known(response: Any, size: int, hasher: Any) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    done = 0
    while done < size:
        n = response.readinto(view[done : min(size, done + _HTTP_CHUNK)])
        if not n:
            break
        hasher.update(view[done : done + n])
        done += n
    view.release()
    del data[done:]
    return data


def _read_unknown(source: ArchiveSource, response: Any, max_bytes: int | None, hasher: Any) -> bytearray:
    data = bytearray()
    while chunk := response.read(_HTTP_CHUNK):
        hasher.update(chunk)
        data += chunk
        if max_bytes is not None and len(data) > max_bytes:
            raise ArchiveUnavailable(
                source, f"it is larger than max_bytes ({max_bytes}); raise max_bytes or check the source"
            )
    return data


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """The URL without user info, and a Basic Authorization header made of it (None without)."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return parts._replace(netloc=host).geturl(), "Basic " + base64.b64encode(token).decode("ascii")


def _http_status_reason(status: int, reason: str) -> str:
    what = f"the server answered HTTP {status} {reason}".rstrip()
    if status == 404 or status == 410:
        return f"{what}; check the URL (the archive is not there)"
    if status in (401, 403):
        return f"{what}; check the URL's credentials or signature (a presigned URL may have expired)"
    if status >= 500:
        return f"{what}; the server failed, retry later"
    return f"{what}, not 200 with the archive; check the URL"


def _network_reason(reason: object, timeout_s: float) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within timeout_s ({timeout_s:g} s); check that the server is up, or raise timeout_s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused; check the host and port, and that the server is up"
    if isinstance(reason, socket.gaierror):
        return "the host name does not resolve; check the URL's host"
    return f"network error ({reason}); check the URL and that the server is up"


# -- shared ----------------------------------------------------------------------------------------


def _check_size(source: ArchiveSource, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ArchiveUnavailable(
            source, f"it is {size} bytes, more than max_bytes ({max_bytes}); raise max_bytes or check the source"
        )


def _normal_sha256(value: str) -> str:
    digest = value.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
    return digest


def _file_uri_path(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"file URI {uri!r} names host {parts.netloc!r}; a file URI names a file on this machine: "
            "file:///absolute/path"
        )
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/"):
        raise ValueError(f"file URI {uri!r} has no absolute path; write file:///absolute/path")
    return path


def _check_endpoint(endpoint_url: str, origin: str = "endpoint_url") -> None:
    """ValueError unless `endpoint_url` is http(s)://host[:port]; `origin` names where it was given."""
    try:
        parts = urllib.parse.urlsplit(endpoint_url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.path in ("", "/")
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"{origin} must be http(s)://host[:port] (an S3-compatible store), got {_safe_url(endpoint_url)!r}"
        )
    if parts.username is not None or parts.query:
        raise ValueError(
            f"{origin} must not carry credentials or a query; give the keys in AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY"
        )


def _safe_url(url: str) -> str:
    """`url` without user info, query or fragment: what may be shown."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unbalanced '[' in the host; show nothing that could be a secret
        return "<unparsable URL>"
    host = parts.netloc.rpartition("@")[2]
    shown = urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    return shown + ("?..." if parts.query else "")
