"""Archive sources against real servers on loopback: moto's S3-compatible server and a stdlib HTTP server,
both started here. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import logging
import pickle
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from support import free_port, s3_server, serve_directory

from tenfold.integration.config import AppArgs
from tenfold.integration.sources import (
    ArchiveSource,
    ArchiveUnavailable,
    check_pinned,
    fetch,
    requires_pin,
)
from tenfold.packaging import PinMismatch, verify_archive

ACCESS_KEY = "AKIATENFOLDTESTKEY"
SECRET = "tenfold-secret-9QxZ7w-never-shown"
PASSWORD = "tenfold-password-K3v8-never-shown"
SIGNATURE = "tenfold-signature-e5Jd-never-shown"
BUCKET = "models"
KEY = "linear/v1.pt"
WRONG = "0" * 64


@dataclass(frozen=True)
class Packaged:
    path: Path
    sha256: str
    data: bytes


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Packaged:
    import torch

    from tenfold.packaging import archive_sha256, save

    path = tmp_path_factory.mktemp("sources") / "linear.pt"
    save(torch.nn.Linear(4, 2), path, example_inputs=(torch.zeros(1, 4),))
    return Packaged(path, archive_sha256(path), path.read_bytes())


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Test credentials in the environment, and nothing from this machine's AWS setup."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def s3_endpoint(packaged: Packaged) -> Iterator[str]:
    """moto's S3-compatible server on loopback, holding the archive at s3://models/linear/v1.pt."""
    with s3_server(BUCKET) as upload:
        upload(packaged.path, KEY)
        yield upload.endpoint  # type: ignore[attr-defined]


@pytest.fixture
def s3_checks_credentials(s3_endpoint: str) -> Iterator[None]:
    """The server checks every request's credentials (moto knows none, so every key is refused)."""
    _moto_auth(s3_endpoint, "0")
    try:
        yield
    finally:
        _moto_auth(s3_endpoint, "inf")


def _moto_auth(endpoint: str, unchecked_requests: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=unchecked_requests.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of a directory, plus: /private/NAME (Basic auth reader:PASSWORD), /stream/NAME (no
    Content-Length) and /short.pt (announces 1000 bytes, sends 10)."""

    def do_GET(self) -> None:
        if self.path.startswith("/private/"):
            expected = "Basic " + base64.b64encode(f"reader:{PASSWORD}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self.send_error(401, "Unauthorized")
                return
            self.path = self.path.removeprefix("/private")
        elif self.path.startswith("/stream/"):
            body = Path(self.translate_path(self.path.removeprefix("/stream"))).read_bytes()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
            return
        elif self.path == "/short.pt":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_url(packaged: Packaged) -> Iterator[str]:
    """A stdlib HTTP server on loopback serving the archive's directory."""
    with serve_directory(packaged.path.parent, _Handler) as url:
        yield url


def _closed_port() -> int:
    return free_port()  # bound once, then released: nothing listens there


def _source(kind: str, packaged: Packaged, s3_endpoint: str, http_url: str,
            monkeypatch: pytest.MonkeyPatch) -> ArchiveSource:
    if kind == "local":
        return ArchiveSource.parse(str(packaged.path))
    if kind == "file_uri":
        return ArchiveSource.parse(packaged.path.as_uri())
    if kind == "s3_endpoint_url":
        return ArchiveSource.parse(f"s3://{BUCKET}/{KEY}", endpoint_url=s3_endpoint)
    if kind == "s3_env":
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        return ArchiveSource.parse(f"s3://{BUCKET}/{KEY}")
    if kind == "http":
        return ArchiveSource.parse(f"{http_url}/{packaged.path.name}")
    raise AssertionError(kind)


# -- fetching --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "file_uri", "s3_endpoint_url", "s3_env", "http"])
def test_every_source_gives_the_archive_bytes_checked_against_the_pin(
    kind: str, packaged: Packaged, s3_endpoint: str, http_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(kind, packaged, s3_endpoint, http_url, monkeypatch)
    view = fetch(source, sha256=packaged.sha256)
    assert bytes(view) == packaged.data
    assert view.readonly and view.format == "B" and view.ndim == 1
    # numpy (and so ray.put) takes the bytes where they are: two arrays over the view share memory.
    assert np.shares_memory(np.frombuffer(view, dtype=np.uint8), np.frombuffer(view, dtype=np.uint8))
    verify_archive(view, sha256=packaged.sha256)


def test_the_s3_specific_env_endpoint_wins_over_the_general_one(
    packaged: Packaged, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    source = ArchiveSource.parse(f"s3://{BUCKET}/{KEY}")
    assert source.endpoint_url == s3_endpoint
    assert bytes(fetch(source, sha256=packaged.sha256)) == packaged.data


def test_a_relative_path_means_the_file_in_the_directory_it_was_parsed_in(
    packaged: Packaged, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(packaged.path.parent)
    source = ArchiveSource.parse(packaged.path.name)
    assert source == ArchiveSource("file", str(packaged.path))
    monkeypatch.chdir("/")
    assert bytes(fetch(source, sha256=None)) == packaged.data
    # A relative path that names no file: the message says where it was looked for, and why there.
    with pytest.raises(ArchiveUnavailable) as info:
        fetch(ArchiveSource.parse("build/missing.pt"), sha256=None)
    assert "the relative path 'build/missing.pt' was taken from /," in str(info.value)
    assert "not the config file's directory" in str(info.value)


def test_an_archive_without_content_length_is_read_to_its_end(packaged: Packaged, http_url: str) -> None:
    source = ArchiveSource.parse(f"{http_url}/stream/{packaged.path.name}")
    assert bytes(fetch(source, sha256=packaged.sha256)) == packaged.data


def test_user_info_in_a_url_is_sent_as_basic_auth(packaged: Packaged, http_url: str) -> None:
    host = http_url.removeprefix("http://")
    ok = ArchiveSource.parse(f"http://reader:{PASSWORD}@{host}/private/{packaged.path.name}")
    assert bytes(fetch(ok, sha256=packaged.sha256)) == packaged.data
    wrong = ArchiveSource.parse(f"http://reader:not-{PASSWORD}@{host}/private/{packaged.path.name}")
    with pytest.raises(ArchiveUnavailable, match="HTTP 401") as info:
        fetch(wrong, sha256=packaged.sha256)
    assert PASSWORD not in str(info.value)
    assert f"http://{host}/private/{packaged.path.name}" in str(info.value)


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "s3_endpoint_url", "http"])
def test_a_wrong_digest_is_refused_naming_the_source_and_both_digests(
    kind: str, packaged: Packaged, s3_endpoint: str, http_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _source(kind, packaged, s3_endpoint, http_url, monkeypatch)
    with pytest.raises(PinMismatch) as info:
        fetch(source, sha256=WRONG)
    message = str(info.value)
    assert source.describe() in message
    assert packaged.sha256 in message and WRONG in message


def test_a_missing_local_file_is_refused_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(ArchiveUnavailable, match="no such file") as info:
        fetch(ArchiveSource.parse(str(missing)), sha256=None)
    assert str(missing) in str(info.value) and "tenfold package" in str(info.value)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveUnavailable, match="is a directory"):
        fetch(ArchiveSource.parse(str(tmp_path)), sha256=None)


def test_a_missing_s3_key_is_refused_naming_the_object(s3_endpoint: str) -> None:
    source = ArchiveSource.parse(f"s3://{BUCKET}/linear/missing.pt", endpoint_url=s3_endpoint)
    with pytest.raises(ArchiveUnavailable, match="no such object") as info:
        fetch(source, sha256=WRONG)
    assert f"s3://{BUCKET}/linear/missing.pt at {s3_endpoint}" in str(info.value)


def test_an_s3_prefix_is_not_an_archive(s3_endpoint: str) -> None:
    source = ArchiveSource.parse(f"s3://{BUCKET}/linear", endpoint_url=s3_endpoint)
    with pytest.raises(ArchiveUnavailable, match="a prefix"):
        fetch(source, sha256=WRONG)


def test_an_http_404_is_refused_naming_the_url(http_url: str) -> None:
    with pytest.raises(ArchiveUnavailable, match="HTTP 404") as info:
        fetch(ArchiveSource.parse(f"{http_url}/missing.pt"), sha256=WRONG)
    assert f"{http_url}/missing.pt" in str(info.value)


def test_a_closed_http_port_is_refused_naming_the_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}/m.pt"
    with pytest.raises(ArchiveUnavailable, match="connection refused") as info:
        fetch(ArchiveSource.parse(url), sha256=WRONG)
    assert url in str(info.value)


def test_a_closed_s3_port_is_refused_naming_the_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    source = ArchiveSource.parse(f"s3://{BUCKET}/{KEY}", endpoint_url=endpoint)
    with pytest.raises(ArchiveUnavailable, match="cannot reach the store") as info:
        fetch(source, sha256=WRONG, timeout_s=2)
    assert f"s3://{BUCKET}/{KEY} at {endpoint}" in str(info.value)


def test_refused_s3_credentials_say_which_to_check(s3_endpoint: str, s3_checks_credentials: None) -> None:
    source = ArchiveSource.parse(f"s3://{BUCKET}/{KEY}", endpoint_url=s3_endpoint)
    with pytest.raises(ArchiveUnavailable, match="access denied") as info:
        fetch(source, sha256=WRONG)
    assert "AWS_SECRET_ACCESS_KEY" in str(info.value) and str(source) in str(info.value)


def test_a_silent_server_times_out_within_the_bound() -> None:
    with socket.socket() as listener:  # accepts connections (the backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/m.pt"
        started = time.monotonic()
        with pytest.raises(ArchiveUnavailable, match=r"no answer within timeout_s \(0.5 s\)") as info:
            fetch(ArchiveSource.parse(url), sha256=WRONG, timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert url in str(info.value)


def test_a_transfer_cut_short_is_refused(http_url: str) -> None:
    with pytest.raises(ArchiveUnavailable, match="ended after 10 of 1000 bytes"):
        fetch(ArchiveSource.parse(f"{http_url}/short.pt"), sha256=WRONG)


@pytest.mark.parametrize("kind", ["local", "s3_endpoint_url", "http", "http_stream"])
def test_an_archive_over_max_bytes_is_refused(
    kind: str, packaged: Packaged, s3_endpoint: str, http_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "http_stream":
        source = ArchiveSource.parse(f"{http_url}/stream/{packaged.path.name}")
    else:
        source = _source(kind, packaged, s3_endpoint, http_url, monkeypatch)
    limit = len(packaged.data) - 1
    with pytest.raises(ArchiveUnavailable, match=rf"max_bytes \({limit}\)") as info:
        fetch(source, sha256=packaged.sha256, max_bytes=limit)
    assert source.describe() in str(info.value)
    assert bytes(fetch(source, sha256=packaged.sha256, max_bytes=len(packaged.data))) == packaged.data


# -- secrets ---------------------------------------------------------------------------------------


def test_credentials_appear_in_no_message_and_no_log_record(
    packaged: Packaged, s3_endpoint: str, http_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    host = http_url.removeprefix("http://")
    s3 = ArchiveSource.parse(f"s3://{BUCKET}/{KEY}", endpoint_url=s3_endpoint)
    failures: list[Exception] = []
    attempts = [
        (s3, WRONG),
        (ArchiveSource.parse(f"s3://{BUCKET}/missing.pt", endpoint_url=s3_endpoint), WRONG),
        (ArchiveSource.parse(f"s3://{BUCKET}/{KEY}", endpoint_url=f"http://127.0.0.1:{_closed_port()}"), WRONG),
        (ArchiveSource.parse(f"http://reader:{PASSWORD}@{host}/private/{packaged.path.name}?sig={SIGNATURE}"), WRONG),
        (ArchiveSource.parse(f"http://reader:{PASSWORD}@{host}/missing.pt?X-Amz-Signature={SIGNATURE}"), WRONG),
    ]
    for source, sha256 in attempts:
        with pytest.raises((ArchiveUnavailable, PinMismatch)) as info:
            fetch(source, sha256=sha256, timeout_s=2)
        failures.append(info.value)
    _moto_auth(s3_endpoint, "0")
    try:
        with pytest.raises(ArchiveUnavailable, match="access denied") as info:
            fetch(s3, sha256=WRONG)
        failures.append(info.value)
    finally:
        _moto_auth(s3_endpoint, "inf")
    assert bytes(fetch(s3, sha256=packaged.sha256)) == packaged.data
    texts = [str(e) for e in failures] + [repr(e) for e in failures] + [repr(s) for s, _ in attempts] + [caplog.text]
    for secret in (SECRET, PASSWORD, SIGNATURE):
        assert not [t for t in texts if secret in t], secret
    # The log did record the fetches, by their safe names.
    fetched = [r.getMessage() for r in caplog.records if r.name == "tenfold.integration.sources"]
    assert any(f"s3://{BUCKET}/{KEY} at {s3_endpoint}" in m for m in fetched)
    assert any(f"http://{host}/missing.pt?..." in m for m in fetched)


def test_a_url_is_displayed_without_user_info_or_query() -> None:
    source = ArchiveSource.parse(f"https://reader:{PASSWORD}@models.example:8443/a/m.pt?X-Amz-Signature={SIGNATURE}#x")
    assert str(source) == source.describe() == "https://models.example:8443/a/m.pt?..."
    assert repr(source) == "ArchiveSource('https://models.example:8443/a/m.pt?...')"
    assert source.location.endswith(SIGNATURE + "#x")  # kept for the fetch, never shown
    plain = ArchiveSource.parse("https://models.example/a/m.pt")
    assert str(plain) == "https://models.example/a/m.pt"


def test_a_source_and_its_error_survive_pickling(s3_endpoint: str) -> None:
    source = ArchiveSource.parse(f"s3://{BUCKET}/missing.pt", endpoint_url=s3_endpoint)
    assert pickle.loads(pickle.dumps(source)) == source
    with pytest.raises(ArchiveUnavailable) as info:
        fetch(source, sha256=WRONG)
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is ArchiveUnavailable and str(copy) == str(info.value) and copy.source == source


# -- parsing and pins ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("archive", "scheme", "location"),
    [
        ("/abs/m.pt", "file", "/abs/m.pt"),
        ("file:///abs/a%20b.pt", "file", "/abs/a b.pt"),
        ("file://localhost/abs/m.pt", "file", "/abs/m.pt"),
        ("file:/abs/m.pt", "file", "/abs/m.pt"),
        ("S3://bucket/dir/m.pt?v=1", "s3", "bucket/dir/m.pt?v=1"),
        ("http://h/m.pt", "http", "http://h/m.pt"),
        ("https://h:8443/m.pt?sig=1", "https", "https://h:8443/m.pt?sig=1"),
    ],
)
def test_accepted_forms(archive: str, scheme: str, location: str) -> None:
    source = ArchiveSource.parse(archive)
    assert (source.scheme, source.location) == (scheme, location)


def test_a_colon_in_a_plain_name_is_still_a_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ArchiveSource.parse("v1:m.pt") == ArchiveSource("file", str(tmp_path / "v1:m.pt"))


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        ("gs://bucket/m.pt", "unsupported scheme gs://; give a local path"),
        ("ftp://host/m.pt", "s3://bucket/key"),
        ("s3://bucket", "names no object; write s3://bucket/key"),
        ("s3:///key", "names no object"),
        ("s3:bucket/key", "not a valid S3 URI"),
        ("file://otherhost/m.pt", "names host 'otherhost'"),
        ("http:///m.pt", "has no host"),
        ("  ", "archive is empty"),
    ],
)
def test_other_forms_are_refused_with_the_accepted_ones(archive: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ArchiveSource.parse(archive)


def test_the_endpoint_is_explicit_else_s3_specific_else_general(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{BUCKET}/{KEY}"
    assert ArchiveSource.parse(uri).endpoint_url is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:9000")
    assert ArchiveSource.parse(uri).endpoint_url == "http://general:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:9000")
    assert ArchiveSource.parse(uri).endpoint_url == "http://s3only:9000"
    assert ArchiveSource.parse(uri, endpoint_url="https://given").endpoint_url == "https://given"
    assert str(ArchiveSource.parse(uri, endpoint_url="https://given")) == f"{uri} at https://given"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "s3only:9000")
    with pytest.raises(ValueError, match=r"AWS_ENDPOINT_URL_S3 must be http\(s\)://host\[:port\]"):
        ArchiveSource.parse(uri)


@pytest.mark.parametrize(
    ("archive", "endpoint_url", "message"),
    [
        ("m.pt", "http://minio:9000", "endpoint_url applies to s3:// archives only"),
        ("http://h/m.pt", "http://minio:9000", "endpoint_url applies to s3:// archives only"),
        ("s3://b/k", "minio:9000", r"endpoint_url must be http\(s\)://host\[:port\]"),
        ("s3://b/k", "http://minio:9000/some/path", r"endpoint_url must be http\(s\)://host\[:port\]"),
        ("s3://b/k", f"http://user:{PASSWORD}@minio:9000", "must not carry credentials"),
    ],
)
def test_a_bad_endpoint_is_refused(archive: str, endpoint_url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        ArchiveSource.parse(archive, endpoint_url=endpoint_url)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("archive", "pinned"),
    [("/abs/m.pt", False), ("file:///abs/m.pt", False), ("s3://b/k", True), ("http://h/m", True),
     ("https://h/m", True)],
)
def test_every_source_but_a_local_file_requires_a_pin(archive: str, pinned: bool) -> None:
    source = ArchiveSource.parse(archive)
    assert requires_pin(source) is pinned
    if pinned:
        with pytest.raises(ValueError, match="sha256 must be set"):
            check_pinned(source, None)
    else:
        check_pinned(source, None)
    check_pinned(source, WRONG)


def test_fetch_refuses_an_unpinned_remote_source_before_connecting() -> None:
    source = ArchiveSource.parse(f"http://127.0.0.1:{_closed_port()}/m.pt")
    with pytest.raises(ValueError, match="tenfold inspect LOCAL_COPY") as info:
        fetch(source, sha256=None)
    assert not isinstance(info.value, ArchiveUnavailable)
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits, got 'abc'"):
        fetch(source, sha256="abc")


@pytest.mark.parametrize("archive", ["s3://models/linear/v1.pt", "https://models.example/linear.pt"])
def test_app_args_refuse_a_remote_archive_without_sha256(archive: str) -> None:
    with pytest.raises(ValidationError) as info:
        AppArgs(archive=archive)
    message = str(info.value)
    assert f"sha256 must be set when archive is {archive}" in message
    assert "tenfold inspect LOCAL_COPY" in message and "sha256sum LOCAL_COPY" in message
    args = AppArgs(archive=archive, sha256=f"sha256:{WRONG}")
    assert args.sha256 == WRONG


def test_app_args_take_an_endpoint_and_local_archives_unpinned(tmp_path: Path) -> None:
    args = AppArgs(archive="s3://models/m.pt", sha256=WRONG, endpoint_url="http://127.0.0.1:9000")
    assert args.endpoint_url == "http://127.0.0.1:9000"
    assert AppArgs(archive="build/m.pt").sha256 is None
    assert AppArgs(archive=(tmp_path / "m.pt").as_uri()).sha256 is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"archive": "gs://b/m.pt", "sha256": WRONG}, "unsupported scheme gs://"),
        ({"archive": "m.pt", "endpoint_url": "http://minio:9000"}, "endpoint_url applies to s3:// archives only"),
        ({"archive": "s3://b/m.pt", "sha256": WRONG, "endpoint_url": "minio:9000"}, "endpoint_url must be"),
    ],
)
def test_app_args_refuse_an_archive_the_builder_cannot_read(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AppArgs(**fields)
