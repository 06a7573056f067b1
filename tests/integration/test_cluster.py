"""tenfold.integration beyond one driver: `serve run` of a YAML config, and a deployer that exits before its
replica restarts (nodes that do not share a filesystem: test_real_cluster.py).

The first needs a Ray of its own, so it runs in a subprocess (the session fixture's Ray stays untouched); the
deployer is a task of the session's Ray whose worker process exits once it is done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from support import free_port, pid_alive, running_replicas, stop_with_ctrl_c, subprocess_env, wait_for
from testmodels import serve_models

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.ray


def _expected(x: torch.Tensor, k: torch.Tensor) -> tuple[list, list]:
    with torch.no_grad():
        y, k2 = serve_models.Probe()(x, k)
    return y.tolist(), k2.tolist()


def test_serve_run_of_a_yaml_config_answers_http(probe_archive: Path, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "model.pt").write_bytes(probe_archive.read_bytes())
    config = tmp_path / "probe.yaml"
    config.write_text(
        "proxy_location: HeadOnly\n"
        f"http_options: {{host: 127.0.0.1, port: {port}}}\n"
        "applications:\n"
        "  - name: probe\n"
        "    route_prefix: /\n"
        "    import_path: tenfold.integration:app_builder\n"
        "    args: {archive: model.pt, interpreters: 1, num_cpus: 0.5}\n"  # relative to where serve run starts
    )
    serve = Path(sys.executable).with_name("serve")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(serve), "run", "--address", "local", str(config)], cwd=tmp_path, env=subprocess_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        answer = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = requests.post(f"http://127.0.0.1:{port}/", json={"inputs": [[[1, 2, 3, 4]], [3]]}, timeout=10)
                if answer.status_code == 200:
                    break
            except requests.RequestException:  # not up yet
                pass
            time.sleep(1.0)
        assert answer is not None and answer.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        want_y, want_k = _expected(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([3]))
        np.testing.assert_allclose(np.array(answer.json()["outputs"][0]), np.array(want_y), rtol=1e-6)
        assert answer.json()["outputs"][1] == want_k
    finally:
        code = stop_with_ctrl_c(proc, log)  # serve run shuts Serve and its Ray down
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_a_replica_that_starts_after_its_deployer_exited_still_gets_the_archive(serve_session, probe_archive: Path,
                                                                                 tmp_path: Path) -> None:
    import ray
    from ray import serve
    from testmodels.serve_callers import deploy_and_exit

    archive = tmp_path / "orphan.pt"
    archive.write_bytes(probe_archive.read_bytes())
    try:
        deployer = ray.get(deploy_and_exit.remote(str(archive), "orphan"), timeout=300)
        wait_for(lambda: not pid_alive(deployer), 60, "the deployer's process to exit")
        url = f"{serve_session.url}/orphan"
        old = requests.get(f"{url}/-/stats", timeout=30).json()["pid"]
        # The deployer is gone; its replica dies and Serve starts another, which must resolve the archive again.
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: _pid_or_none(url) not in (None, old), 120, "a new replica answering")
        assert running_replicas("orphan", "orphan") == 1
        x, k = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([3])
        r = requests.post(url, json={"inputs": [x.tolist(), k.tolist()]}, timeout=30)
        assert r.status_code == 200, r.text
        want_y, want_k = _expected(x, k)
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]), np.array(want_y), rtol=1e-6)
        assert r.json()["outputs"][1] == want_k
    finally:
        serve.delete("orphan")


def _pid_or_none(url: str) -> int | None:
    try:
        r = requests.get(f"{url}/-/stats", timeout=10)
    except requests.RequestException:
        return None
    return r.json()["pid"] if r.status_code == 200 else None
