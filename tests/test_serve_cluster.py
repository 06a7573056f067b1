"""tenfold.integration beyond the session's Ray: a 2-node cluster, and `serve run` of a YAML config.

Both need a Ray of their own, so each runs in a subprocess (the session fixture's Ray stays untouched).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import _serve_models  # noqa: E402

pytestmark = pytest.mark.ray


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=65536")
    return env


def _stop_with_ctrl_c(proc: subprocess.Popen, log: Any) -> int:
    """What Ctrl-C does; the exit code. A process that does not stop within 90 s is killed, and fails the test."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        log.close()


def _expected(x: torch.Tensor, k: torch.Tensor) -> tuple[list, list]:
    with torch.no_grad():
        y, k2 = _serve_models.Probe()(x, k)
    return y.tolist(), k2.tolist()


def test_a_replica_on_a_second_node_serves_the_same_archive(probe_archive: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(TESTS / "_serve_cluster_main.py"), str(probe_archive)],
                          capture_output=True, text=True, timeout=420, env=_env(), cwd=tmp_path)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, (done.stdout[-2000:], done.stderr[-3000:])
    found = json.loads(lines[-1])
    nodes = {r["node_id"] for r in found["replicas"]}
    assert nodes == {found["head_node"], found["worker_node"]}, found
    assert all(r["served"] >= 1 for r in found["replicas"]), found  # both served inference, not just loaded
    x, k = torch.arange(40, dtype=torch.float32).reshape(10, 4), torch.arange(10)
    want_y, want_k = _expected(x, k)
    assert found["distinct_outputs"] == 1
    np.testing.assert_allclose(np.array(found["output"][0]), np.array(want_y), rtol=1e-6)
    assert found["output"][1] == want_k


def test_serve_run_of_a_yaml_config_answers_http(probe_archive: Path, tmp_path: Path) -> None:
    from conftest import free_port

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
    proc = subprocess.Popen([str(serve), "run", "--address", "local", str(config)], cwd=tmp_path, env=_env(),
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
        code = _stop_with_ctrl_c(proc, log)  # serve run shuts Serve and its Ray down
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_tenfold_serve_serves_an_archive_prints_how_to_call_it_and_stops_on_ctrl_c(probe_archive: Path,
                                                                                 tmp_path: Path) -> None:
    from conftest import free_port

    port = free_port()
    archive = tmp_path / "probe.pt"
    archive.write_bytes(probe_archive.read_bytes())
    log_path = tmp_path / "tenfold-serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tenfold", "serve", str(archive), "--interpreters", "1",
                             "--port", str(port)], cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops serving" not in log_path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1.0)
        printed = log_path.read_text()
        assert proc.poll() is None, printed[-3000:]
        request_file = tmp_path / "probe.request.json"  # the body the printed curl command sends
        assert f"-d @{request_file}" in printed and "serve.get_app_handle('probe')" in printed
        r = requests.post(f"http://127.0.0.1:{port}/", data=request_file.read_bytes(),
                          headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 200, r.text
        assert [len(o) for o in r.json()["outputs"]] == [1, 1]  # the printed request is one valid row
    finally:
        code = _stop_with_ctrl_c(proc, log)
    assert code == 0, log_path.read_text()[-3000:]
    assert "stopping: draining replicas" in log_path.read_text()
