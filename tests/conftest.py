"""Shared fixtures: ONE local Ray with Serve for the whole session, and a small packaged test model.

Ray takes long to start on a 2-core machine, so every Ray test shares `serve_session`; each test runs
its own application (distinct name and route prefix) and deletes it when done. Replicas reserve
fractional CPUs so that several fit in the session's 4 logical CPUs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Replicas report autoscaling figures every 10 s by default: too slow for a test. Ray's processes
# inherit this environment, so it is set before the session's Ray starts.
_RAY_ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_DEDUP_LOGS": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
