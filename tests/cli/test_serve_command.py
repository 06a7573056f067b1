"""`tenfold serve` and `./dev serve`: serve one model or several, print how to call each (curl and a Python handle
snippet, which work as printed), and stop cleanly on Ctrl-C."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from support import ROOT, free_port, run_python, stop_with_ctrl_c, subprocess_env, wait_for

pytestmark = pytest.mark.ray


@contextmanager
def serving(command: list[str], cwd: Path, log_path: Path) -> Iterator[str]:
    """Run `command` until it prints that it serves; yield what it printed; then Ctrl-C it, which must stop it
    cleanly (exit 0, Serve and Ray shut down)."""
    log = log_path.open("w")
    proc = subprocess.Popen(command, cwd=cwd, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops serving" not in log_path.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1.0)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        yield log_path.read_text()
    finally:
        code = stop_with_ctrl_c(proc, log)
    assert code == 0, log_path.read_text()[-3000:]
    assert "stopping: draining replicas" in log_path.read_text()


def curl(printed: str, which: int = 0) -> requests.Response:
    """The `which`-th printed `curl -s -X POST ...` call, sent as printed (its body inline or from its file)."""
    line = [x for x in printed.splitlines() if "curl -s -X POST" in x][which]
    words = shlex.split(line)
    url, data = words[words.index("-X") + 2], words[words.index("-d") + 1]
    body = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode()
    return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)


def run_snippet(printed: str) -> subprocess.CompletedProcess[str]:
    """The printed Python handle snippet, run as printed (with the environment it is prefixed with)."""
    prefix, snippet = printed.split(f"{sys.executable} - <<'PY'\n", 1)
    snippet = snippet.split("\n  PY\n", 1)[0]
    env = dict(kv.split("=", 1) for kv in prefix.rsplit("\n", 1)[-1].split())  # e.g. RAY_AUTH_MODE=token
    return run_python(textwrap.dedent(snippet), env=subprocess_env(**env), timeout=120)


def test_tenfold_serve_serves_an_archive_prints_how_to_call_it_and_stops_on_ctrl_c(probe_archive: Path,
                                                                                 tmp_path: Path) -> None:
    archive = tmp_path / "probe.pt"
    archive.write_bytes(probe_archive.read_bytes())
    command = [sys.executable, "-m", "tenfold", "serve", str(archive), "--interpreters", "1",
               "--port", str(free_port()), "--http-port", "0", "--name", "probe-app", "--max-request-bytes", "4096",
               "--request-timeout-s", "7", "--num-cpus", "1"]
    with serving(command, tmp_path, tmp_path / "serve.log") as printed:
        assert "tenfold is serving 'probe-app'" in printed
        assert "(x: float32[?, 4], k: int64[?])" in printed
        assert "http_port" not in printed  # --http-port 0: Serve's route only
        r = curl(printed)
        assert r.status_code == 200, r.text
        assert [len(o) for o in r.json()["outputs"]] == [1, 1]  # the printed request is one valid row
        url = r.url
        too_large = requests.post(url, data=b" " * 5000, headers={"Content-Type": "application/json"}, timeout=30)
        assert too_large.status_code == 413 and "4096" in too_large.text, too_large.text
        # The application has the name given; its deployment, the model's (as app_builder names it).
        assert requests.get(f"{url}-/openapi.json", timeout=30).json()["info"]["title"] == "probe"
        handle = run_snippet(printed)
        assert handle.returncode == 0, handle.stderr[-3000:]
        assert handle.stdout.strip().startswith("(tensor(") and "tensor([0])" in handle.stdout  # (y, 2 * k)


def test_tenfold_serve_of_several_archives_serves_each_at_its_name_and_prints_how_to_call_each(
        probe_archive: Path, tmp_path: Path) -> None:
    for name in ("left", "right"):
        (tmp_path / f"{name}.pt").write_bytes(probe_archive.read_bytes())
    port, http_port = free_port(), free_port()
    archives = [str(tmp_path / "left.pt"), str(tmp_path / "right.pt")]
    options = ["--interpreters", "1", "--port", str(port), "--http-port", str(http_port), "--num-cpus", "1"]
    command = [sys.executable, "-m", "tenfold", "serve", *archives, *options]
    with serving(command, tmp_path, tmp_path / "serve.log") as printed:
        assert "tenfold is serving 'models'" in printed
        assert "Model 'left'" in printed and "Model 'right'" in printed
        calls = [curl(printed, i) for i in range(4)]  # each model through the proxy, then on http_port
        assert [c.url.rsplit(":", 1)[1] for c in calls] == [f"{port}/left", f"{http_port}/left",
                                                            f"{port}/right", f"{http_port}/right"]
        assert all(c.status_code == 200 for c in calls), [c.text for c in calls]
        assert calls[0].content == calls[1].content == calls[2].content  # the same model under two names
        # Each loaded on its first request (http_port's figures are a snapshot taken a few times a second).
        wait_for(lambda: set(requests.get(f"http://127.0.0.1:{http_port}/-/stats", timeout=30).json()["models"])
                 == {"left", "right"}, 10, "both models in the figures")
        handle = run_snippet(printed)  # the first model's, by multiplexed_model_id
        assert handle.returncode == 0, handle.stderr[-3000:]
        assert handle.stdout.strip().startswith("(tensor(")
    # Refused before anything starts, with what to do.
    for refused, said in (([*archives, archives[0]], "the same file name"),
                          ([*archives, "--sha256", "0" * 64], "--sha256 pins one archive")):
        done = subprocess.run([sys.executable, "-m", "tenfold", "serve", *refused, *options], cwd=tmp_path,
                              env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and said in done.stderr, done.stderr[-2000:]


def test_dev_serve_with_its_defaults_serves_the_embedder_answering_text(tmp_path: Path) -> None:
    port, http_port = free_port(), free_port()
    command = [str(ROOT / "dev"), "serve", "--port", str(port), "--http-port", str(http_port)]
    with serving(command, ROOT, tmp_path / "dev.log") as printed:
        assert "tenfold is serving 'minilm_embedder'" in printed
        assert "(texts: list[str]) -> list[list[float]]" in printed
        r = curl(printed)
        assert r.status_code == 200, r.text
        embeddings = r.json()["outputs"]  # one per text of the example request
        straight = curl(printed, 1)  # the same request to the interpreters' own servers
        assert f":{http_port}/" in straight.url
        assert straight.status_code == 200 and straight.content == r.content
        assert len(embeddings) == 2 and all(len(e) == 384 for e in embeddings)
        assert all(abs(sum(v * v for v in e) - 1.0) < 1e-4 for e in embeddings)  # normalised
        handle = run_snippet(printed)
        assert handle.returncode == 0, handle.stderr[-3000:]
        got = json.loads(handle.stdout.strip().splitlines()[-1])
        assert [v for e in got for v in e] == pytest.approx([v for e in embeddings for v in e], abs=1e-6)


def test_serve_build_writes_a_config_of_an_application_a_module_builds(probe_archive: Path, tmp_path: Path) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    (tmp_path / "my_app.py").write_text(textwrap.dedent(f"""\
        from tenfold.integration import app_builder

        app = app_builder({{"archive": {str(probe_archive)!r}, "interpreters": 2, "http_port": 8001}})
    """))
    serve = Path(sys.executable).with_name("serve")
    done = subprocess.run([str(serve), "build", "my_app:app", "-o", "serve.yaml"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    config = ServeDeploySchema.model_validate(yaml.safe_load((tmp_path / "serve.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "my_app:app"
    (deployment,) = app.deployments
    # What the builder set travels in the config: the replica's CPUs and environment, and the rolling update.
    assert deployment.ray_actor_options.num_cpus == 2.0
    assert deployment.ray_actor_options.runtime_env["env_vars"]["GLIBC_TUNABLES"].startswith("glibc.rtld")
    assert deployment.max_surge_percent == 100
