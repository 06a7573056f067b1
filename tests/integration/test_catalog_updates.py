"""Updates without a restart in an application of several archives: a deploy whose config changes only the
deployment's `user_config` (`{archives: {name: {archive, sha256}}}`) swaps the archive of each model it names
inside the running replica, on Serve's route, handles and http_port; the models it leaves out serve their archives
of args, as a replica started with that config would. A model
held is loaded again into the same interpreters, and the requests begun on its old version end on it; a model not
held is checked at once and loads its new archive on its first request; an update that fails its checks leaves
the model serving its archive and says why.

Configs are applied as `serve deploy` applies them (the controller's `deploy_apps`). Each test starts from a
config it waits to see served, so that they pass in any order.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from support import file_sha256, free_port, mapped, serve_message, wait_for
from testmodels import catalog_models

pytestmark = pytest.mark.ray

APP, NAME = "catalog-updates", "several"


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tenfold.packaging import save

    root = tmp_path_factory.mktemp("catalog-updates")
    paths = {}
    for name in ("alpha", "beta", "gamma", "alpha2", "gamma2"):
        paths[name] = root / f"{name}.pt"
        save(getattr(catalog_models, name), paths[name], example_inputs=catalog_models.example_inputs(), name=name)
    return paths


def ref(path: Path) -> dict[str, str]:
    return {"archive": str(path), "sha256": file_sha256(path)}


@pytest.fixture(scope="module")
def app(serve_session, archives: dict[str, Path]) -> Iterator[SimpleNamespace]:  # noqa: ANN001
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    port = free_port()
    args = {"archives": {name: ref(archives[name]) for name in ("alpha", "beta", "gamma")}, "name": NAME,
            "interpreters": 2, "num_cpus": 0.5, "http_port": port, "http_host": "127.0.0.1"}
    applications = {APP: {"name": APP, "route_prefix": f"/{APP}", "import_path": "tenfold.integration:app_builder",
                          "args": args}}

    def apply() -> None:
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(
            {"applications": list(applications.values())}))

    def deploy(user_config: dict[str, Any]) -> None:
        applications[APP]["deployments"] = [{"name": NAME, "user_config": user_config}]
        apply()

    ns = SimpleNamespace(url=f"{serve_session.url}/{APP}", port_url=f"http://127.0.0.1:{port}", deploy=deploy,
                         apply=apply, applications=applications, handle=lambda: serve.get_app_handle(APP))
    apply()
    wait_for(lambda: requests.get(f"{ns.url}/-/manifest", timeout=30).status_code == 200, 120, "the application")
    try:
        yield ns
    finally:
        for name in applications:
            serve.delete(name)


def tag(url: str, model: str, *texts: str) -> list[dict[str, Any]]:
    r = requests.post(f"{url}/{model}", json={"inputs": [list(texts or ["x"])]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def answers(url: str, model: str) -> str:
    return tag(url, model)[0]["model"]


def manifest(url: str) -> dict[str, Any]:
    return requests.get(f"{url}/-/manifest", timeout=30).json()


def stats(url: str) -> dict[str, Any]:
    return requests.get(f"{url}/-/stats", timeout=30).json()


def serving(app: SimpleNamespace, archives: dict[str, Path], **updated: str) -> dict[str, Any]:
    """Deploy a user_config that gives each model of `updated` the archive named, and wait until the replica
    serves it: those models their new archives, the others their archives of args. Its manifest then."""
    app.deploy({"archives": {model: ref(archives[name]) for model, name in updated.items()}})
    want = {model: file_sha256(archives[updated.get(model, model)]) for model in ("alpha", "beta", "gamma")}
    return wait_for(lambda: (m := manifest(app.url)) and {k: v["sha256"] for k, v in m["models"].items()} == want
                    and m, 60, f"the replica to serve {want}")


def test_a_deploy_that_changes_one_models_archive_swaps_it_in_the_running_replica_and_leaves_the_others(
        app: SimpleNamespace, archives: dict[str, Path]) -> None:
    serving(app, archives)  # every model on its archive of args
    for url in (app.url, app.port_url):
        assert answers(url, "alpha") == "alpha" and answers(url, "beta") == "beta"
    before = manifest(app.url)
    loaded_beta = stats(app.url)["models"]["beta"]
    # A request on each route holds alpha's old version while the update comes.
    with ThreadPoolExecutor(2) as pool:
        slow = {url: pool.submit(tag, url, "alpha", "hold:2") for url in (app.url, app.port_url)}
        wait_for(lambda: stats(app.url)["models"]["alpha"]["requests"] == 2, 30, "both slow requests to hold alpha")
        serving(app, archives, alpha="alpha2")
        # New requests go to the new version at once, on every route; those begun before end on the old one.
        assert answers(app.url, "alpha") == "alpha-2"
        wait_for(lambda: answers(app.port_url, "alpha") == "alpha-2", 10, "http_port to serve the new version")
        assert app.handle().options(multiplexed_model_id="alpha").remote(["h"]).result(timeout_s=60)[0]["model"] \
            == "alpha-2"
        assert {url: f.result()[0]["model"] for url, f in slow.items()} == {app.url: "alpha", app.port_url: "alpha"}

    after = manifest(app.url)
    assert after["pid"] == before["pid"] and after["updates"] == before["updates"] + 1, after
    assert after["models"]["alpha"]["source"] == str(archives["alpha2"])
    assert requests.get(f"{app.port_url}/-/manifest", timeout=30).json()["models"]["alpha"]["sha256"] == \
        file_sha256(archives["alpha2"])
    assert requests.get(f"{app.url}/alpha/-/manifest", timeout=30).json()["manifest"]["name"] == "alpha2"
    # beta was left out of the user_config: the same version, loaded once.
    assert answers(app.url, "beta") == "beta" and answers(app.port_url, "beta") == "beta"
    assert stats(app.url)["models"]["beta"]["loaded_at"] == loaded_beta["loaded_at"]
    # alpha's old archive is unmapped once its requests have ended: its weights' memory went with it.
    wait_for(lambda: not mapped(after["pid"], archives["alpha"]), 30, "alpha's old archive to be unmapped")
    assert mapped(after["pid"], archives["alpha2"]) and mapped(after["pid"], archives["beta"])

    # The user_config is the whole truth, as for a replica that starts with it: a model it leaves out goes back
    # to its archive of args, in place.
    reverted = serving(app, archives)
    assert reverted["pid"] == after["pid"] and reverted["updates"] == after["updates"] + 1
    assert answers(app.url, "alpha") == "alpha"
    wait_for(lambda: answers(app.port_url, "alpha") == "alpha", 10, "http_port to serve alpha's archive of args")
    wait_for(lambda: not mapped(after["pid"], archives["alpha2"]), 30, "alpha2 to be unmapped")


def test_a_model_not_loaded_is_checked_at_once_and_loads_its_new_archive_on_first_use(
        app: SimpleNamespace, archives: dict[str, Path]) -> None:
    assert "gamma" not in stats(app.url)["models"]  # no other test asks for gamma
    serving(app, archives, gamma="gamma2")
    assert "gamma" not in stats(app.url)["models"]  # checked, not loaded
    document = requests.get(f"{app.port_url}/gamma/-/openapi.json", timeout=30).json()
    assert document["info"]["version"] == file_sha256(archives["gamma2"])[:12], document["info"]
    assert document["info"]["description"].startswith("gamma2 "), document["info"]
    assert answers(app.port_url, "gamma") == "gamma-2" and answers(app.url, "gamma") == "gamma-2"
    pid = manifest(app.url)["pid"]
    assert mapped(pid, archives["gamma2"]) and not mapped(pid, archives["gamma"])


def test_an_update_that_fails_its_checks_leaves_the_model_serving_and_says_why(
        app: SimpleNamespace, archives: dict[str, Path]) -> None:
    before = serving(app, archives)
    assert answers(app.url, "beta") == "beta"
    wrong_pin = {"archive": str(archives["alpha2"]), "sha256": "0" * 64}
    for user_config, said, keeps in (
            ({"archives": {"beta": wrong_pin}}, "but user_config pins " + "0" * 64,
             f"model 'beta' goes on serving {archives['beta']}"),
            ({"archives": {"delta": ref(archives["alpha2"])}}, "no model 'delta' here", "every model keeps its"),
            ({"archive": str(archives["alpha2"])}, "{archives: {NAME:", "every model keeps its")):
        app.deploy(user_config)
        got = wait_for(lambda s=said: (m := manifest(app.url))["refused_update"] is not None and
                       s in m["refused_update"]["error"] and m, 60, f"{user_config} to be refused")
        assert got["pid"] == before["pid"] and got["updates"] == before["updates"]
        assert got["models"]["beta"]["sha256"] == before["models"]["beta"]["sha256"]
        assert answers(app.url, "beta") == "beta" and answers(app.port_url, "beta") == "beta"
        warnings = stats(app.url)["warnings"]
        assert any("was refused" in w and said in w and keeps in w for w in warnings), warnings
    # The next config that can be served clears the refusal.
    serving(app, archives)
    wait_for(lambda: manifest(app.url)["refused_update"] is None, 30, "the refusal to be cleared")


def test_a_replica_started_with_a_user_config_serves_its_models_archives_from_the_start(
        app: SimpleNamespace, serve_session, archives: dict[str, Path]) -> None:  # noqa: ANN001
    from ray import serve

    name = "catalog-updates-fresh"
    app.applications[name] = {
        "name": name, "route_prefix": f"/{name}", "import_path": "tenfold.integration:app_builder",
        "args": {"archives": {"alpha": ref(archives["alpha"]), "beta": ref(archives["beta"])}, "name": "fresh",
                 "interpreters": 1, "num_cpus": 0.5},
        "deployments": [{"name": "fresh", "user_config": {"archives": {"alpha": ref(archives["alpha2"])}}}]}
    app.apply()
    try:
        url = f"{serve_session.url}/{name}"
        wait_for(lambda: requests.get(f"{url}/-/manifest", timeout=30).status_code == 200, 120, "the replica")
        got = manifest(url)
        assert got["models"]["alpha"]["sha256"] == file_sha256(archives["alpha2"]) and got["updates"] == 0, got
        assert answers(url, "alpha") == "alpha-2" and answers(url, "beta") == "beta"
        assert not mapped(got["pid"], archives["alpha"])
    finally:
        del app.applications[name]
        serve.delete(name)


def test_a_replica_that_starts_with_a_user_config_it_cannot_serve_fails_and_serve_says_why(
        app: SimpleNamespace, archives: dict[str, Path]) -> None:
    from ray import serve

    name = "catalog-updates-refused"
    app.applications[name] = {
        "name": name, "route_prefix": f"/{name}", "import_path": "tenfold.integration:app_builder",
        "args": {"archives": {"alpha": ref(archives["alpha"])}, "name": "refused", "interpreters": 1,
                 "num_cpus": 0.5},
        "deployments": [{"name": "refused", "user_config": {"archives": {
            "alpha": {"archive": str(archives["alpha2"]), "sha256": "2" * 64}}}}]}
    app.apply()
    try:
        message = serve_message(name, "refused", "PinMismatch")
        assert str(archives["alpha2"]) in message and "but user_config pins " + "2" * 64 in message, message
    finally:
        del app.applications[name]
        serve.delete(name)

