"""Durable serving on a real Ray: archives from S3 and HTTP shared through the object store, released when no
application uses them, fetched again when lost, lost interpreters replaced in place, and a chaos run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from support import (
    TEST_AWS_ENV,
    plasma_usage,
    running_replicas,
    s3_server,
    serve_directory,
    serve_message,
    subprocess_env,
    wait_for,
)
from testmodels import reliability_models as models

import tenfold.packaging as tp

pytestmark = pytest.mark.ray

X = [[1.0, 2.0, 3.0, 4.0]]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Archives of the reliability models, in a directory served over HTTP and in an S3-compatible server."""
    directory = tmp_path_factory.mktemp("store")
    archives = {}
    for name, cls in models.MODELS.items():
        path = directory / f"{name}.pt"
        tp.save(cls(), path, example_inputs=models.example_inputs(), name=name)
        archives[name] = path
    saved = dict(os.environ)
    os.environ.update(TEST_AWS_ENV)  # the builder reads the archive here, as replicas do in Ray's processes
    try:
        with serve_directory(directory) as http_url, s3_server() as upload:
            yield SimpleNamespace(dir=directory, http=http_url, upload=upload, archives=archives,
                                  sha={n: tp.archive_sha256(p) for n, p in archives.items()})
    finally:
        os.environ.clear()
        os.environ.update(saved)


def deploy(serve_session, name: str, args: dict) -> str:  # noqa: ANN001
    from ray import serve

    from tenfold.integration import app_builder

    serve.run(app_builder({"num_cpus": 0.25, "interpreters": 1, **args, "name": name}), name=name,
              route_prefix=f"/{name}")
    return f"{serve_session.url}/{name}"


def post(url: str, x: list, timeout: float = 30) -> requests.Response:
    return requests.post(url, json={"inputs": [x]}, timeout=timeout)


def replica_manifests(url: str, replicas: int) -> dict[int, dict]:
    """pid -> `/-/manifest` of each of the app's `replicas` replicas (asked until all have answered)."""
    found: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    while len(found) < replicas and time.monotonic() < deadline:
        m = requests.get(f"{url}/-/manifest", timeout=30).json()
        found[m["pid"]] = m
    assert len(found) == replicas, found
    return found


def test_archives_from_s3_and_http_are_served_and_shared_once_per_node(serve_session, store) -> None:  # noqa: ANN001
    from ray import serve

    from tenfold.integration import published_digests

    s3 = store.upload(store.archives["healthy"], "healthy/v1.pt")
    digest = store.sha["healthy"]
    try:
        url = deploy(serve_session, "from-s3", {"archive": s3, "endpoint_url": store.upload.endpoint,
                                                "sha256": digest, "num_replicas": 2})
        replicas = replica_manifests(url, 2)
        # One replica fetched it into the object store; the other mapped that object.
        assert sorted(m["archive_from"] for m in replicas.values()) == ["object store", "source"]
        assert {m["sha256"] for m in replicas.values()} == {digest}
        assert all(m["source"].startswith("s3://models/healthy/v1.pt at http://127.0.0.1:") for m in replicas.values())
        assert digest in published_digests()
        np.testing.assert_allclose(post(url, X).json()["outputs"][0], models.expected(X), rtol=1e-5)
        url = deploy(serve_session, "from-http", {"archive": f"{store.http}/healthy.pt", "sha256": digest})
        assert replica_manifests(url, 1)[next(iter(replica_manifests(url, 1)))]["archive_from"] == "object store"
        np.testing.assert_allclose(post(url, X).json()["outputs"][0], models.expected(X), rtol=1e-5)
    finally:
        serve.delete("from-s3")
        serve.delete("from-http")
    wait_for(lambda: digest not in published_digests(), 30, "the archive withdrawn once no replica uses it")


def test_a_uri_without_a_pin_is_refused_before_anything_is_deployed(store) -> None:  # noqa: ANN001
    from pydantic import ValidationError

    from tenfold.integration import app_builder

    with pytest.raises(ValidationError, match="sha256 must be set when archive is http://127.0.0.1"):
        app_builder({"archive": f"{store.http}/healthy.pt"})


def test_a_replica_that_cannot_get_the_archive_anywhere_fails_naming_the_source(serve_session, store) -> None:  # noqa: ANN001
    import shutil

    from ray import serve

    from tenfold.integration import app_builder

    gone = store.dir / "gone.pt"
    shutil.copy(store.archives["healthy"], gone)
    app = app_builder({"archive": f"{store.http}/gone.pt", "sha256": store.sha["healthy"], "num_cpus": 0.25,
                       "interpreters": 1, "name": "gone"})  # checked while the source has it
    gone.unlink()
    try:
        with pytest.raises(RuntimeError, match="Deploying application gone failed"):
            serve.run(app, name="gone", route_prefix="/gone")
        message = serve.status().applications["gone"].deployments["gone"].message  # the replica's own error
        assert f"cannot fetch archive {store.http}/gone.pt" in message and "404" in message, message
    finally:
        serve.delete("gone")


def test_a_local_archive_that_neither_this_node_nor_its_deploying_node_can_give_fails_saying_what_to_do(
        serve_session, tmp_path: Path) -> None:  # noqa: ANN001
    import ray

    from tenfold.integration import archive_cache
    from tenfold.integration.sources import ArchiveSource

    missing = ArchiveSource("file", str(tmp_path / "elsewhere.pt"))

    @ray.remote(num_cpus=0)
    def attempt(deployed_on: str | None, read_there: bool) -> str:
        node = deployed_on or ray.get_runtime_context().get_node_id()
        locator = archive_cache.ArchiveLocator(missing, "0" * 64, 1, None, node)
        try:
            if read_there:  # as a replica of another node would: the deploying node is asked to read it
                archive_cache._read_on_deploying_node(locator, 30)
            else:
                archive_cache.resolve(locator)
        except Exception as exc:  # noqa: BLE001 - what a replica would fail with
            return f"{type(exc).__name__}: {exc}"
        return "resolved"

    gone = ray.get(attempt.remote("ff" * 28, False))
    assert gone.startswith(f"ArchiveUnavailable: cannot fetch archive {missing.location}: this node (") and \
        f"the node that deployed it ({'ff' * 28}) is gone" in gone, gone
    unreadable = ray.get(attempt.remote(None, True))
    assert "nor can the node that deployed it" in unreadable and "no such file" in unreadable, unreadable
    for message in (gone, unreadable):  # what to do
        assert "keep the file on that node" in message and "shared filesystem" in message and "s3://" in message
    assert not archive_cache.published_digests()  # a failed claim leaves nothing behind


def test_an_archive_packaged_again_at_its_path_is_reported_and_never_served_unpinned(serve_session, store,  # noqa: ANN001
                                                                                     tmp_path: Path) -> None:
    from ray import serve

    path = tmp_path / "model.pt"
    path.write_bytes(store.archives["healthy"].read_bytes())
    url = deploy(serve_session, "repackaged", {"archive": str(path), "num_replicas": 2, "health_check_period_s": 1.0})
    try:
        pids = wait_for(lambda: len(p := {requests.get(f"{url}/-/stats", timeout=30).json()["pid"] for _ in range(8)})
                        == 2 and p, 60, "both replicas answering")
        # Packaged again at the same path, as `tenfold package` writes: a new file renamed over the old one.
        again = tmp_path / ".model.pt.tmp"
        tp.save(models.Healthy(), again, example_inputs=models.example_inputs(), name="healthy-v2")
        new_sha = tp.archive_sha256(again)
        os.replace(again, path)
        old_sha = store.sha["healthy"]
        # The running replicas keep the deployed version, and say that the path now holds another one.
        stats = wait_for(lambda: (s := requests.get(f"{url}/-/stats", timeout=30).json()).get("warnings") and s, 30,
                         "a replica to report the changed file")
        assert old_sha in stats["warnings"][0] and new_sha in stats["warnings"][0], stats
        manifest = requests.get(f"{url}/-/manifest", timeout=30).json()
        assert manifest["sha256"] == old_sha and manifest["manifest"]["name"] == "healthy"
        # A replica started now (here: in place of a killed one) refuses the file, naming both digests and the
        # way to roll it out; the other replica keeps serving meanwhile.
        os.kill(sorted(pids)[0], signal.SIGKILL)
        message = serve_message("repackaged", "repackaged", "changed since the application was deployed")
        assert f"sha256 {old_sha}" in message and f"sha256 {new_sha}" in message and str(path) in message, message
        assert f"sha256: {new_sha}" in message, message  # what to put in the args
        for _ in range(5):
            r = requests.post(url, json={"inputs": [X]}, timeout=30)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["outputs"][0], models.expected(X), rtol=1e-5)
        assert requests.get(f"{url}/-/manifest", timeout=30).json()["sha256"] == old_sha
    finally:
        serve.delete("repackaged")


def test_redeploying_five_archives_keeps_at_most_two_in_the_object_store_and_delete_frees_them(
        serve_session, store, tmp_path: Path) -> None:  # noqa: ANN001
    import torch
    from ray import serve
    from testmodels.packaging_models import Big

    base_mib, _ = plasma_usage()
    peak = 0
    try:
        for version in range(5):
            torch.manual_seed(version)  # each archive different: ~50 MB of other weights
            path = store.dir / f"big{version}.pt"
            tp.save(Big(50), path, example_inputs=(torch.ones(1),))
            url = deploy(serve_session, "cycle", {"archive": f"{store.http}/big{version}.pt",
                                                  "sha256": tp.archive_sha256(path)})
            assert post(url, [1.0]).status_code == 200
            path.unlink()
            peak = max(peak, plasma_usage()[0] - base_mib)
        assert peak < 2 * 50 + 10, f"{peak} MiB held at most; one archive is 50"
    finally:
        serve.delete("cycle")
    wait_for(lambda: plasma_usage()[0] - base_mib < 5, 30, "the last archive freed after delete")
    print(f"\nobject store over five redeploys of 50 MB archives: at most {peak} MiB held; "
          f"{plasma_usage()[0] - base_mib} MiB after delete")


def test_a_lost_interpreter_is_replaced_within_5_s_and_the_replica_goes_on(serve_session, store) -> None:  # noqa: ANN001
    from ray import serve

    url = deploy(serve_session, "replace", {"archive": str(store.archives["native_sleep"]), "interpreters": 2,
                                            "request_timeout_s": 1.0, "interrupt_grace_s": 0.5})
    try:
        pid = requests.get(f"{url}/-/stats", timeout=30).json()["pid"]
        r = post(url, [[models.SLEEP, 8.0, 0, 0]])  # stuck in native code: 504, then lost
        assert r.status_code == 504
        lost_at = time.monotonic()
        stats = wait_for(lambda: (s := requests.get(f"{url}/-/stats", timeout=30).json())["replaced"] == 1 and
                         s["healthy"] == 2 and s, 8, "the lost interpreter replaced")
        replaced_in = time.monotonic() - lost_at
        print(f"\ninterpreter replaced {replaced_in:.2f} s after the 504")
        assert replaced_in < 5.0 + 1.0  # 1 s of grace and polling on top of the 5 s
        assert stats["pid"] == pid, "replaced in place: the replica did not restart"
        answers = [post(url, X) for _ in range(6)]
        assert all(a.status_code == 200 for a in answers)
        np.testing.assert_allclose(answers[0].json()["outputs"][0], models.expected(X), rtol=1e-5)
    finally:
        serve.delete("replace")


def test_a_replica_whose_lost_interpreters_hold_too_much_recycles_and_no_other_request_fails(
        serve_session, store) -> None:  # noqa: ANN001
    url = deploy(serve_session, "recycle", {"archive": str(store.archives["native_sleep"]), "interpreters": 2,
                                            "num_replicas": 2, "request_timeout_s": 1.0, "interrupt_grace_s": 0.5,
                                            "health_check_period_s": 1.0, "max_lost_memory_mb": 1.0})
    from ray import serve

    def pids() -> set[int]:
        return {requests.get(f"{url}/-/stats", timeout=30).json()["pid"] for _ in range(10)}

    try:
        before = wait_for(lambda: len(p := pids()) == 2 and p, 60, "both replicas answering")
        answers: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                answers.append(post(url, X).status_code)

        clients = [threading.Thread(target=load) for _ in range(2)]
        for c in clients:
            c.start()
        try:
            # Stuck in native code: 504, and its interpreter is lost for good, with what it held. Its replica keeps
            # serving from its other interpreter, but recycles: Serve drains it and starts a fresh process.
            assert post(url, [[models.SLEEP, 8.0, 0, 0]]).status_code == 504
            after = wait_for(lambda: len(p := pids()) == 2 and len(p & before) == 1 and p, 120,
                             "one replica to be replaced by a fresh process")
        finally:
            stop.set()
            for c in clients:
                c.join()
        assert len(after - before) == 1
        assert answers and set(answers) == {200}, {code: answers.count(code) for code in set(answers)}
        status = serve.status().applications["recycle"].deployments["recycle"]
        assert status.replica_states.get("RUNNING") == 2, status
    finally:
        serve.delete("recycle")


def test_the_node_holding_the_archive_dies_and_a_new_replica_fetches_it_again(store, tmp_path: Path) -> None:  # noqa: ANN001
    s3 = store.upload(store.archives["healthy"], "healthy/node.pt")
    done = subprocess.run(
        [sys.executable, str(HERE / "object_loss_script.py"), s3, store.upload.endpoint, store.sha["healthy"]],
        capture_output=True, text=True, timeout=420, env=subprocess_env(**TEST_AWS_ENV), cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, (done.stdout[-2000:], done.stderr[-3000:])
    found = json.loads(lines[-1])
    assert found["first"]["archive_from"] == "source" and found["first"]["node"] == found["removed_node"]
    assert found["after"]["node"] != found["removed_node"]
    assert found["after"]["archive_from"] == "source", found  # the object went with its node: fetched again
    print(f"\nnode removed: a new replica served {found['recovery_s']:.1f} s later, the archive fetched again")
    np.testing.assert_allclose(found["output"], models.expected(X), rtol=1e-5)


def test_chaos_every_request_answers_and_the_app_ends_whole(serve_session, store) -> None:  # noqa: ANN001
    """Under bounded load: the replica owning the archive's object is killed, an interpreter is lost in native
    code; every request gets a 200, or a 5xx while its replica was dying; the app ends at full capacity, and
    the object store and the replicas' processes are back to what they were."""
    import psutil
    from ray import serve

    from tenfold.integration import published_digests

    s3 = store.upload(store.archives["crash"], "crash/chaos.pt")
    base_mib, _ = plasma_usage()
    url = deploy(serve_session, "chaos", {"archive": s3, "endpoint_url": store.upload.endpoint,
                                          "sha256": store.sha["crash"], "num_replicas": 2, "interpreters": 2,
                                          "request_timeout_s": 2.0, "interrupt_grace_s": 0.5,
                                          "health_check_period_s": 1.0, "health_check_timeout_s": 10.0})
    stop, statuses = threading.Event(), []

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    status = session.post(url, json={"inputs": [X]}, timeout=30).status_code
                except requests.RequestException:
                    status = 599
                statuses.append((sent, status))
                time.sleep(0.02)

    try:
        replicas = replica_manifests(url, 2)
        owner = next(pid for pid, m in replicas.items() if m["archive_from"] == "source")
        clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for t in clients:
            t.start()
        wait_for(lambda: [s for _, s in statuses].count(200) >= 10, 30, "the clients served")
        killed = time.monotonic()
        os.kill(owner, signal.SIGKILL)  # the process holding the archive's object
        assert post(url, [[models.SLEEP, 6.0, 0, 0]], timeout=30).status_code in (504, 500, 502, 503)
        wait_for(lambda: running_replicas("chaos", "chaos") == 2, 90, "two replicas running again")
        recovered = time.monotonic()
        print(f"\nchaos: two replicas running again {recovered - killed:.1f} s after the owner was killed")
        wait_for(lambda: sum(t > recovered for t, _ in statuses) >= 15, 30, "requests sent once it recovered")
        stop.set()
        for t in clients:
            t.join(timeout=60)
        assert [s for _, s in statuses].count(200) > 20
        failed = [(round(t - killed, 1), s) for t, s in statuses if s != 200]
        # Only requests sent while the killed replica was dying and being replaced failed, with a 5xx.
        assert all(s >= 500 and -1.0 <= t <= recovered - killed for t, s in failed), failed
        assert [s for _, s in statuses[-10:]] == [200] * 10  # serving again at the end
        now = replica_manifests(url, 2)
        assert owner not in now and all(psutil.pid_exists(p) for p in now)
        stats = [requests.get(f"{url}/-/stats", timeout=30).json() for _ in range(6)]
        assert all(s["healthy"] == 2 for s in stats), stats  # full capacity: lost interpreters were replaced
    finally:
        stop.set()
        serve.delete("chaos")
    wait_for(lambda: plasma_usage()[0] - base_mib < 5, 30, "the object store back to where it was")
    wait_for(lambda: store.sha["crash"] not in published_digests(), 30, "no entry left for the archive")
    def left() -> list[str]:
        return [f"{p.pid} {p.info['status']} {' '.join(p.info['cmdline'] or [])[:80]}"
                for p in psutil.process_iter(["cmdline", "status"])
                if "ServeReplica:chaos" in " ".join(p.info["cmdline"] or [])]

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), left()
