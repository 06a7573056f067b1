"""`tenfold package` and `tenfold inspect`: package an example by MODULE:FACTORY, print and check an archive."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from support import ROOT

import tenfold.packaging as tp
from tenfold import cli


def test_cli_package_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "tagger.pt"
    assert cli.main(["package", "examples.rnn_tagger:build", "-o", str(out)]) == 0
    assert "RNNTagger (tokens: int64[?, ?])" in capsys.readouterr().out
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("signature (tokens: int64[?, ?])", "interned  examples.rnn_tagger", "extern    ", "12 storages",
                     f"sha256    {tp.archive_sha256(out)}", "content   ok"):
        assert expected in text
    explicit = tmp_path / "explicit.pt"
    args = ["package", "examples.rnn_tagger:build", "-o", str(explicit), "--example-input", "2x10:int64",
            "--dynamic", "tokens:0,1", "--name", "tagger"]
    assert cli.main(args) == 0
    m = tp.read_manifest(explicit)
    assert m.name == "tagger" and m.inputs[0].shape == [None, None]


def test_cli_reports_a_tampered_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    out = tmp_path / "t.pt"
    assert cli.main(["package", "examples.rnn_tagger:build", "-o", str(out)]) == 0
    data = bytearray(out.read_bytes())
    data[data.index(b"GRUCell") + 1] ^= 1  # one byte of the interned source
    out.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 1
    assert "content   FAILED" in capsys.readouterr().out


def test_cli_from_torch_package_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    from torch.package import PackageExporter

    monkeypatch.chdir(ROOT)
    plain = tmp_path / "plain.pt"
    rnn = importlib.import_module("examples.rnn_tagger")
    with PackageExporter(str(plain)) as exp:
        exp.intern("examples.**")
        exp.save_pickle("model", "model.pkl", rnn.build())
    assert cli.main(["inspect", str(plain)]) == 0
    assert "manifest  none" in capsys.readouterr().out
    out = tmp_path / "wrapped.pt"
    assert cli.main(["package", "--from-torch-package", str(plain), "--resource", "model/model.pkl",
                     "--example-input", "1x5:int64", "-o", str(out)]) == 0
    model = tp.load(out, verify=True)
    tokens = rnn.example_inputs()[0]
    assert all(torch.equal(a, b) for a, b in zip(model(tokens), rnn.build()(tokens)))
    assert cli.main(["package", "examples.rnn_tagger:build", "-o", str(out), "--example-input", "2x3:nope"]) == 1
    assert "unknown dtype 'nope'" in capsys.readouterr().err
    assert cli.main(["package", "-o", str(out)]) == 2
    assert cli.main(["inspect", str(tmp_path / "missing.pt")]) == 1


# -- example inputs: tensor specs and JSON values ----------------------------------------------------


def test_an_example_input_is_a_tensor_spec_or_else_a_json_value() -> None:
    tensor = cli.parse_example_input("2x3:float32", seed=0)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 3) and tensor.dtype == torch.float32
    assert cli.parse_example_input("4:int64", seed=0).dtype == torch.int64
    for text, value in (('"a text"', "a text"), ('["pos", "neg"]', ["pos", "neg"]), ("3", 3), ("2.5", 2.5),
                        ("true", True), ("null", None), ('{"k": 2, "labels": ["a"]}', {"k": 2, "labels": ["a"]}),
                        ('"2x3:float32"', "2x3:float32")):  # quoted, a spec is a string
        assert cli.parse_example_input(text, seed=0) == value, text


@pytest.mark.parametrize(("text", "message"), [
    ("a text", """neither SHAPE:DTYPE nor JSON (Expecting value at character 0); a string is JSON in double quotes: """
               """--example-input '"a text"'"""),
    ('["pos", "neg"', "neither SHAPE:DTYPE nor JSON (Expecting ',' delimiter at character 13); give a tensor as "
                      "SHAPE:DTYPE (e.g. 1x3x32x32:float32) or a JSON value"),
    ("2x3:flaot32", "unknown dtype 'flaot32' (e.g. float32, int64)"),
    ("2xx3:int64", "shape must be sizes joined by x, e.g. 2x16"),
])
def test_an_example_input_that_is_neither_says_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        cli.parse_example_input(text, seed=0)
    assert message in str(info.value) and repr(text) in str(info.value)


_CLASSIFY = '''
def classify(text: str, labels: list[str]) -> dict[str, float]:
    words = set(text.lower().split())
    hits = [1 + len(words & set(label.lower().split())) for label in labels]
    return {label: h / sum(hits) for label, h in zip(labels, hits)}
'''


def test_a_string_taking_function_from_outside_the_repository_is_packaged_from_json_inputs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # MODULE is looked up in the current directory, as with `python -m`
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "zero_shot.py").write_text(_CLASSIFY)
    args = ["package", "zero_shot:classify", "-o", "zs.pt",
            "--example-input", '"serve a python model"', "--example-input", '["model serving", "bread"]']
    assert cli.main(args) == 0, capsys.readouterr().err
    assert "wrote zs.pt: classify (text: str, labels: list[str]) -> dict[str, float]" in capsys.readouterr().out
    assert tp.load(tmp_path / "zs.pt", verify=True)("bread", ["bread", "model serving"]) == {
        "bread": 2 / 3, "model serving": 1 / 3}
    # Without examples the message shows both forms; a bare word is refused with the quoting that fixes it.
    assert cli.main(["package", "zero_shot:classify", "-o", "x.pt"]) == 2
    err = capsys.readouterr().err
    assert "zero_shot has no example_inputs(); pass one --example-input per positional argument" in err
    assert "SHAPE:DTYPE (e.g. 1x3x32x32:float32) or a JSON value (e.g. '\"a text\"'" in err
    assert cli.main(["package", "zero_shot:classify", "-o", "x.pt", "--example-input", "serve"]) == 1
    assert """--example-input '"serve"'""" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


_BUILD_ONLY = '''
class Scaler:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, values: list[float]) -> list[float]:
        return [v * self.factor for v in values]


def build() -> Scaler:
    import tqdm  # where the factor comes from, say: needed to build only

    return Scaler(2.0 if tqdm else 1.0)
'''


def test_package_names_a_distribution_it_does_not_require_and_the_flags_that_change_that(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "scaler.py").write_text(_BUILD_ONLY)
    assert cli.main(["package", "scaler:build", "-o", "s.pt", "--example-input", "[1.5]"]) == 0
    out = capsys.readouterr().out
    assert "not required: tqdm (imported only by code that did not run on the example inputs" in out
    assert "To require it: --extern tqdm; to leave it out: --mock tqdm" in out
    assert not [r for r in tp.read_manifest(tmp_path / "s.pt").requirements if r.startswith("tqdm==")]
    assert cli.main(["package", "scaler:build", "-o", "s.pt", "--example-input", "[1.5]", "--extern", "tqdm"]) == 0
    assert "not required" not in capsys.readouterr().out
    assert [r for r in tp.read_manifest(tmp_path / "s.pt").requirements if r.startswith("tqdm==")]
    assert cli.main(["package", "scaler:build", "-o", "s.pt", "--example-input", "[1.5]", "--mock", "tqdm"]) == 0
    assert "not required" not in capsys.readouterr().out
    assert tp.read_manifest(tmp_path / "s.pt").mocked_modules == ["tqdm"]
    assert tp.load(tmp_path / "s.pt")([1.5]) == [3.0]
