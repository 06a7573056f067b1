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
