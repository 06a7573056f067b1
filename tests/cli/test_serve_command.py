"""`tenfold serve`: serves an archive, prints how to call it, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from support import free_port, stop_with_ctrl_c, subprocess_env

pytestmark = pytest.mark.ray


def test_tenfold_serve_serves_an_archive_prints_how_to_call_it_and_stops_on_ctrl_c(probe_archive: Path,
                                                                                 tmp_path: Path) -> None:
    port = free_port()
    archive = tmp_path / "probe.pt"
    archive.write_bytes(probe_archive.read_bytes())
    log_path = tmp_path / "tenfold-serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "tenfold", "serve", str(archive), "--interpreters", "1",
                             "--port", str(port)], cwd=tmp_path, env=subprocess_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
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
        code = stop_with_ctrl_c(proc, log)
    assert code == 0, log_path.read_text()[-3000:]
    assert "stopping: draining replicas" in log_path.read_text()
