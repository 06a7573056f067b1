"""Model updates without a restart: a deploy whose config changes only a deployment's `user_config` (the archive
and its sha256) swaps the model inside the running replica, on Serve's route, on handles and on http_port. The
process, its interpreters and their imports stay; calls begun on the old version end on it; an update that fails
its checks leaves the old version serving and says why.

Configs are applied as `serve deploy` applies them (the controller's `deploy_apps`, which the dashboard's REST API
calls), onto the session's Ray; `tests/integration/test_real_cluster.py` does it with `serve deploy` itself.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from support import file_sha256, free_port, mapped, serve_message, wait_for
from testmodels import version_models
from testmodels.reliability_models import started

pytestmark = pytest.mark.ray

APP, NAME = "updates", "versioned"
_tokens = itertools.count(int(time.time() * 1000) % 2**22 + 1)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Version 1 and 2 of the model, and a corrupt copy of version 2 (one byte of its weights changed)."""
    from tenfold.packaging import save

    root = tmp_path_factory.mktemp("versions")
    paths = {}
    for version, factory in ((1, version_models.version1), (2, version_models.version2)):
        paths[f"v{version}"] = root / f"v{version}.pt"
        save(factory, paths[f"v{version}"], example_inputs=(0.0, 0), name="versioned")
    data = bytearray(paths["v2"].read_bytes())
    data[data.rfind(bytes.fromhex("00000040") * 4)] ^= 0x01  # in the weights (float32 2.0): the archive's own
    # digests no longer match it
    paths["corrupt"] = root / "corrupt.pt"
    paths["corrupt"].write_bytes(bytes(data))
    return paths


@pytest.fixture(scope="module")
def app(serve_session, archives: dict[str, Path]) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = free_port()
    args = {"archive": str(archives["v1"]), "name": NAME, "interpreters": 2, "num_cpus": 0.5, "http_port": port,
            "http_host": "127.0.0.1"}
    # Every application of the config: a deploy removes those of the previous config that it leaves out.
    applications = {APP: {"name": APP, "route_prefix": f"/{APP}", "import_path": "tenfold.integration:app_builder",
                          "args": args}}

    def apply() -> None:
        config = {"applications": list(applications.values())}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))

    def deploy(user_config: dict[str, Any]) -> None:
        applications[APP]["deployments"] = [{"name": NAME, "user_config": user_config}]
        apply()

    ns = SimpleNamespace(deploy=deploy, apply=apply, applications=applications, url=f"{serve_session.url}/{APP}",
                         port_url=f"http://127.0.0.1:{port}", handle=lambda: serve.get_app_handle(APP))
    apply()
    wait_for(lambda: requests.get(f"{ns.url}/-/manifest", timeout=30).status_code == 200, 120, "version 1 to serve")
    try:
        yield ns
    finally:
        for name in applications:
            serve.delete(name)


def answer(url: str, hold_s: float = 0.0, token: int = 0) -> dict[str, Any]:
    r = requests.post(f"{url}/", json={"inputs": [hold_s, token]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def manifest(url: str) -> dict[str, Any]:
    return requests.get(f"{url}/-/manifest", timeout=30).json()


class Load:
    """Requests sent one after another on each route while an update happens: each route's versions, in order,
    and every failure."""

    def __init__(self, app: SimpleNamespace) -> None:
        self.routes = {"serve": app.url, "http_port": app.port_url}
        self.versions: dict[str, list[int]] = {route: [] for route in self.routes}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(route,), daemon=True) for route in self.routes]

    def _send(self, route: str) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                r = session.post(f"{self.routes[route]}/", json={"inputs": [0.0, 0]}, timeout=60)
                if r.status_code == 200:
                    self.versions[route].append(r.json()["outputs"]["version"])
                else:
                    self.failures.append(f"{route}: {r.status_code} {r.text[:300]}")
            except requests.RequestException as exc:
                self.failures.append(f"{route}: {exc!r}")
            time.sleep(0.01)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def update_to(app: SimpleNamespace, archive: Path) -> None:
    app.deploy({"archive": str(archive), "sha256": file_sha256(archive)})


def test_a_deploy_that_changes_only_user_config_swaps_the_model_in_the_running_replica(
        app: SimpleNamespace, archives: dict[str, Path]) -> None:
    before = manifest(app.url)
    old_version = 1 if before["sha256"] == file_sha256(archives["v1"]) else 2  # tests of this module run in any order
    old, new = archives[f"v{old_version}"], archives[f"v{3 - old_version}"]
    calls_before = requests.get(f"{app.url}/-/stats", timeout=30).json()["calls"]
    with Load(app) as load:
        wait_for(lambda: all(load.versions.values()), 60, "both routes to answer")
        update_to(app, new)
        wait_for(lambda: manifest(app.url)["sha256"] == file_sha256(new), 60, "the update to be served")
        wait_for(lambda: all(v and v[-1] != old_version for v in load.versions.values()), 30,
                 "both routes to answer with the new version")
        time.sleep(0.5)  # a little load on the new version alone
    assert load.failures == []
    for route, versions in load.versions.items():
        # Every answer came from one version or the other, and once the new one answered, the old one never again.
        assert set(versions) == {1, 2}, route
        first_new = versions.index(3 - old_version)
        assert set(versions[first_new:]) == {3 - old_version}, (route, versions)

    after = manifest(app.url)
    # Same process, same interpreters: its call count went on (a new pool would start from 0), none was replaced.
    assert after["pid"] == before["pid"]
    assert after["updates"] == before["updates"] + 1 and after["refused_update"] is None
    assert after["source"] == str(new) and after["manifest"]["name"] == "versioned"
    stats = requests.get(f"{app.url}/-/stats", timeout=30).json()
    assert stats["calls"] > calls_before and all(i["replaced"] == 0 for i in stats["interpreters"])
    assert requests.get(f"{app.port_url}/-/manifest", timeout=30).json()["sha256"] == file_sha256(new)
    assert app.handle().remote(0.0, 0).result(timeout_s=60)["version"] == 3 - old_version
    # The old version's archive is unmapped once its calls have ended: its weights' memory went with it.
    wait_for(lambda: not mapped(after["pid"], old), 30, "the old archive to be unmapped")
    assert mapped(after["pid"], new)


def test_calls_begun_on_the_old_version_end_on_it_and_new_calls_go_to_the_new_one(
        app: SimpleNamespace, archives: dict[str, Path]) -> None:
    current = manifest(app.url)["sha256"]
    old_version = 1 if current == file_sha256(archives["v1"]) else 2
    new = archives["v2"] if old_version == 1 else archives["v1"]
    results: dict[str, dict] = {}
    tokens = {route: next(_tokens) for route in ("serve", "http_port")}
    urls = {"serve": app.url, "http_port": app.port_url}
    threads = [threading.Thread(target=lambda r=route: results.__setitem__(r, answer(urls[r], 3.0, tokens[r])))
               for route in urls]
    for t in threads:
        t.start()
    wait_for(lambda: all(started(t) for t in tokens.values()), 30, "both slow calls to start")
    update_to(app, new)
    wait_for(lambda: manifest(app.url)["sha256"] == file_sha256(new), 60, "the update to be served")
    assert answer(app.url)["version"] == 3 - old_version
    assert answer(app.port_url)["version"] == 3 - old_version
    for t in threads:
        t.join(60)
    assert {r: v["version"] for r, v in results.items()} == {"serve": old_version, "http_port": old_version}


def test_an_update_that_fails_its_checks_leaves_the_old_version_serving_and_says_why(
        app: SimpleNamespace, archives: dict[str, Path]) -> None:
    before = manifest(app.url)
    serving = answer(app.url)["version"]
    wrong_pin = {"archive": str(archives["v2"]), "sha256": "0" * 64}
    corrupt = {"archive": str(archives["corrupt"]), "sha256": file_sha256(archives["corrupt"])}
    missing = {"archive": str(archives["v2"].with_name("missing.pt")), "sha256": "1" * 64}
    for user_config, said in ((wrong_pin, "but user_config pins " + "0" * 64), (corrupt, "corrupt.pt"),
                              (missing, "missing.pt")):
        app.deploy(user_config)
        got = wait_for(lambda c=user_config: (m := manifest(app.url))["refused_update"] is not None and
                       m["refused_update"]["sha256"] == c["sha256"] and m, 60, f"the update to {user_config} refused")
        assert said in got["refused_update"]["error"], got["refused_update"]
        assert got["pid"] == before["pid"] and got["sha256"] == before["sha256"]
        assert answer(app.url)["version"] == serving and answer(app.port_url)["version"] == serving
        warnings = requests.get(f"{app.url}/-/stats", timeout=30).json()["warnings"]
        assert any("was refused" in w and said in w for w in warnings), warnings
    # A good update after refused ones is served, and clears the refusal.
    good = archives["v2"] if serving == 1 else archives["v1"]
    update_to(app, good)
    wait_for(lambda: manifest(app.url)["sha256"] == file_sha256(good), 60, "the good update to be served")
    assert manifest(app.url)["refused_update"] is None and answer(app.url)["version"] == 3 - serving


def test_a_replica_started_with_a_user_config_serves_its_archive_from_the_start(
        app: SimpleNamespace, serve_session, archives: dict[str, Path]) -> None:  # noqa: ANN001
    from ray import serve

    name = "updates-fresh"
    app.applications[name] = {
        "name": name, "route_prefix": f"/{name}", "import_path": "tenfold.integration:app_builder",
        "args": {"archive": str(archives["v1"]), "name": "fresh", "interpreters": 1, "num_cpus": 0.5},
        "deployments": [{"name": "fresh", "user_config": {"archive": str(archives["v2"]),
                                                          "sha256": file_sha256(archives["v2"])}}]}
    app.apply()
    try:
        url = f"{serve_session.url}/{name}"
        wait_for(lambda: requests.get(f"{url}/-/manifest", timeout=30).status_code == 200, 120, "the replica")
        got = manifest(url)
        assert got["sha256"] == file_sha256(archives["v2"]) and got["updates"] == 0, got  # loaded once, not swapped
        assert answer(url)["version"] == 2
        assert not mapped(got["pid"], archives["v1"])
    finally:
        del app.applications[name]
        serve.delete(name)


def test_a_replica_that_starts_with_a_user_config_it_cannot_serve_fails_and_serve_says_why(
        app: SimpleNamespace, archives: dict[str, Path]) -> None:
    from ray import serve

    name = "updates-refused"
    app.applications[name] = {
        "name": name, "route_prefix": f"/{name}", "import_path": "tenfold.integration:app_builder",
        "args": {"archive": str(archives["v1"]), "name": "refused", "interpreters": 1, "num_cpus": 0.5},
        "deployments": [{"name": "refused", "user_config": {"archive": str(archives["v2"]), "sha256": "2" * 64}}]}
    app.apply()
    try:
        message = serve_message(name, "refused", "PinMismatch")
        assert str(archives["v2"]) in message and "but user_config pins " + "2" * 64 in message, message
    finally:
        del app.applications[name]
        serve.delete(name)


def test_a_relative_path_in_user_config_is_taken_from_where_the_application_was_built(tmp_path: Path) -> None:
    from tenfold.integration import ModelUpdate, app_builder  # noqa: F401 - the public names
    from tenfold.integration.archive_cache import ArchiveLocator
    from tenfold.integration.sources import ArchiveSource
    from tenfold.integration.updates import locate

    deployed = ArchiveLocator(ArchiveSource.parse(str(tmp_path / "v1.pt")), "a" * 64, 1, None, "node-1")
    update = ModelUpdate.model_validate({"archive": "models/v2.pt", "sha256": "SHA256:" + "B" * 64})
    got = locate(update, workdir=str(tmp_path), deployed=deployed)
    assert got.source.location == str(tmp_path / "models" / "v2.pt") and got.sha256 == "b" * 64
    assert got.node_id == "node-1"  # a node that cannot read it gets it from the node that deployed the application
    remote = locate(ModelUpdate.model_validate({"archive": "https://example.com/v2.pt", "sha256": "c" * 64}),
                    workdir=str(tmp_path), deployed=deployed)
    assert remote.source.scheme == "https" and remote.node_id is None
    with pytest.raises(ValueError, match="sha256"):
        ModelUpdate.model_validate({"archive": "models/v2.pt"})
    with pytest.raises(ValueError, match="extra|unexpected|not permitted"):
        ModelUpdate.model_validate({"archive": "models/v2.pt", "sha256": "b" * 64, "sha": 1})


def test_an_old_version_is_dropped_only_once_its_last_stream_is_closed(tmp_path: Path) -> None:
    from testmodels import stream_models

    from tenfold.integration import archive_cache, updates
    from tenfold.integration.archive_cache import ArchiveLocator
    from tenfold.integration.sources import ArchiveSource
    from tenfold.packaging import open_source, replicate, save
    from tenfold.runtime import InterpreterPool

    path = tmp_path / "ticks.pt"
    save(stream_models.ticks, path, example_inputs=stream_models.EXAMPLE, name="ticks")
    locator = ArchiveLocator(ArchiveSource.parse(str(path)), file_sha256(path), path.stat().st_size)
    dropped = threading.Event()
    with InterpreterPool(1, threads_per_interpreter=1) as pool:
        resolved = archive_cache.Resolved(open_source(str(path))[0], "file")
        version = updates.serve_version(locator, resolved, replicate(pool, resolved.buffer))
        stream = version.model.stream(5, 0.05, -1, 0)
        items = iter(stream)
        assert next(items) == 0
        updates.retire(version, still_used=lambda model_id: 0, grace_s=60, done=lambda v: dropped.set())
        # Its stream goes on to its end on the version it began on, which is dropped only after it.
        assert list(items) == [1, 2, 3, 4]
        assert dropped.wait(10)
        assert version.archive.buffer is None  # the bytes went with it, whoever still holds the version
        with pytest.raises(RuntimeError, match="closed"):
            version.model.submit(1, 0.0, -1, 0)
