"""Shared fixtures: ONE local Ray with Serve for the whole session, and a small packaged test model.

Ray takes long to start on a 2-core machine, so every Ray test shares `serve_session`; each test runs
its own application (distinct name and route prefix) and deletes it when done. Replicas reserve
fractional CPUs so that several fit in the session's 4 logical CPUs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import TEST_AWS_ENV, TESTS, free_port, subprocess_env

# Replicas report autoscaling figures every 10 s by default: too slow for a test. Ray's processes
# inherit this environment, so it is set before the session's Ray starts.
_RAY_ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_OFFLINE": "1",  # replicas load Hugging Face code: nothing may be fetched from a hub
    **TEST_AWS_ENV,  # replicas fetch archives from the tests' S3-compatible server
}


_IN_OWN_PROCESS = "TENFOLD_TEST_IN_OWN_PROCESS"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A test marked `own_process` runs alone in a new pytest process. Such tests lose interpreters: a lost
    interpreter holds one of the process's namespaces for good, and the next test could find none left."""
    if pyfuncitem.get_closest_marker("own_process") is None or os.environ.get(_IN_OWN_PROCESS):
        return None
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
                         cwd=pyfuncitem.config.rootpath, env=subprocess_env(**{_IN_OWN_PROCESS: "1"}),
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0 or not re.search(r"\b1 passed\b", run.stdout):
        pytest.fail(f"in its own process (exit {run.returncode}):\n{run.stdout[-8000:]}\n{run.stderr[-3000:]}",
                    pytrace=False)
    return True


@dataclass(frozen=True)
class ServeSession:
    """The session's Ray Serve: HTTP on `url` (append an application's route prefix)."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def serve_session() -> Iterator[ServeSession]:
    import ray
    from ray import serve

    port = free_port()
    saved = dict(os.environ)
    os.environ.update(_RAY_ENV)
    # Replicas of test-defined deployments (testmodels/serve_callers.py) import from here.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    try:
        ray.init(num_cpus=4, include_dashboard=False, namespace="tenfold-tests", log_to_driver=False)
    finally:  # Ray's processes have their environment; the rest of the session keeps its own
        os.environ.clear()
        os.environ.update(saved)
    # serve.run and serve.delete wait for Serve by asking it once a second: ten times a second here, which takes
    # about half a second off each of the suite's many deploys and deletes.
    from ray.serve._private import client as serve_client

    serve_client.CLIENT_POLLING_INTERVAL_S = 0.1
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield ServeSession(port=port)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def probe_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`testmodels/serve_models.py:Probe` packaged with tenfold.packaging.save."""
    from testmodels import serve_models as _serve_models

    from tenfold.packaging import save

    path = tmp_path_factory.mktemp("archives") / "probe.pt"
    save(_serve_models.probe, path, example_inputs=_serve_models.example_inputs(), name="probe")
    return path


def _package_example(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    import importlib

    from tenfold.packaging import save

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the examples' weights come from an installed package
    if str(TESTS.parent) not in sys.path:
        sys.path.insert(0, str(TESTS.parent))  # where `examples` lives
    module = importlib.import_module(f"examples.{name}")
    path = tmp_path_factory.mktemp("examples") / f"{name}.pt"
    save(module.build, path, example_inputs=module.example_inputs())
    return path


@pytest.fixture(scope="session")
def minilm_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`examples/minilm_embedder.py` (all-MiniLM-L6-v2 with its tokenizer) packaged with its defaults."""
    return _package_example(tmp_path_factory, "minilm_embedder")


@pytest.fixture(scope="session")
def search_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`examples/semantic_search.py` (the encoder plus a corpus and its embeddings) packaged with its defaults."""
    return _package_example(tmp_path_factory, "semantic_search")
