"""The example models: deterministic, packaged by one command, equal after a round trip, and loadable by an
interpreter that cannot import examples/."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from support import ROOT, subprocess_env

import tenfold.packaging as tp

EXAMPLES = ["examples.rnn_tagger", "examples.resnet", "examples.text_encoder"]


def _module(name: str) -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def _flat(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, tuple, list[torch.Tensor]]]:
    """Each example packaged with its module defaults: archive, example inputs, the original's output."""
    out = {}
    tmp = tmp_path_factory.mktemp("examples")
    for name in EXAMPLES:
        mod = _module(name)
        model = mod.build()
        inputs = mod.example_inputs()
        path = tmp / f"{name.split('.')[1]}.pt"
        manifest = tp.save(model, path, example_inputs=inputs, dynamic=getattr(mod, "DYNAMIC", None))
        assert name in manifest.interned_modules
        with torch.no_grad():
            out[name] = (path, inputs, _flat(model(*inputs)))
    return out


@pytest.mark.parametrize("name", EXAMPLES)
def test_round_trip_output_equals_the_original(name: str, packaged: dict) -> None:
    path, inputs, want = packaged[name]
    model = tp.load(path, verify=True)
    got = _flat(model(*inputs))
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    assert type(model).__module__.startswith("<torch_package_"), "the code comes from the archive"


@pytest.mark.parametrize("name", EXAMPLES)
def test_factories_are_deterministic(name: str) -> None:
    mod = _module(name)
    a, b = mod.build().state_dict(), mod.build().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], mod.build(seed=1).state_dict()[k]) for k in a)


def test_example_sizes_and_signatures(packaged: dict) -> None:
    resnet = tp.read_manifest(packaged["examples.resnet"][0])
    assert 10e6 <= resnet.weight_bytes / 4 <= 25e6
    assert [s.describe() for s in resnet.inputs] == ["images: float32[?, 3, 32, 32]"]
    tagger = tp.read_manifest(packaged["examples.rnn_tagger"][0])
    assert [s.describe() for s in tagger.inputs] == ["tokens: int64[?, ?]"]
    assert [s.dtype for s in tagger.outputs] == ["float32", "int64"]
    encoder = tp.read_manifest(packaged["examples.text_encoder"][0])
    assert [s.describe() for s in encoder.inputs] == ["text: uint8[?, ?]"]


def test_dynamic_dimensions_accept_other_sizes(packaged: dict) -> None:
    text = _module("examples.text_encoder")
    encoder = tp.load(packaged["examples.text_encoder"][0])
    longer = text.encode_texts(["a much longer sentence than any of the examples, to change the length", "x"])
    assert encoder(longer).shape == (2, 128)
    tagger = tp.load(packaged["examples.rnn_tagger"][0])
    scores, tags = tagger(torch.randint(2, 1000, (3, 7)))
    assert scores.shape == (3, 7, 12) and tags.shape == (3, 7)


def test_archives_load_in_an_interpreter_that_cannot_import_examples(packaged: dict, tmp_path: Path) -> None:
    expected = tmp_path / "expected.pt"
    torch.save({name: (str(p), inputs, want) for name, (p, inputs, want) in packaged.items()}, expected)
    code = textwrap.dedent(f"""
        import importlib.util, sys, torch
        import tenfold.packaging as tp
        from tenfold.runtime import InterpreterPool
        assert importlib.util.find_spec("examples") is None, sys.path
        cases = torch.load({str(expected)!r}, weights_only=False)
        with InterpreterPool(1) as pool:
            assert pool.submit(importlib.util.find_spec, "examples").result() is None
            for name, (path, inputs, want) in cases.items():
                with tp.replicate(pool, path) as model:
                    out = model(*inputs)
                    got = list(out) if isinstance(out, (tuple, list)) else [out]
                    for g, w in zip(got, want, strict=True):
                        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
                    print("OK", name)
    """)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line.split()[1] for line in run.stdout.splitlines() if line.startswith("OK")] == list(packaged)


# -- Hugging Face examples: Python values in and out ------------------------------------------------

TEXTS = ["A replica serves requests for a deployment.", "The tide left crabs in pools on the rocks.", "héllo 🌍"]


def test_the_minilm_embedder_matches_sentence_transformers(minilm_archive: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from examples.minilm_embedder import model_dir

    m = tp.read_manifest(minilm_archive)
    assert m.signature() == "(texts: list[str]) -> list[list[float]]"
    assert m.interned_modules == ["examples.minilm_embedder"]
    assert {"transformers", "tokenizers", "torch"} <= {r.split("==")[0] for r in m.requirements}
    got = torch.tensor(tp.load(minilm_archive)(TEXTS))
    want = torch.from_numpy(SentenceTransformer(model_dir(), device="cpu").encode(TEXTS, normalize_embeddings=True))
    assert got.shape == want.shape == (3, 384)
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert bool((cosine >= 0.9999).all()), cosine
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))


def test_the_hugging_face_examples_answer_in_interpreters_as_in_the_host(minilm_archive: Path,
                                                                        search_archive: Path) -> None:
    from tenfold.runtime import InterpreterPool

    embed, search = tp.load(minilm_archive), tp.load(search_archive)
    with InterpreterPool(2, threads_per_interpreter=1) as pool:
        with tp.replicate(pool, minilm_archive) as model:
            answers = [f.result() for f in [model.submit(TEXTS) for _ in range(4)]]
            for got in answers:
                torch.testing.assert_close(torch.tensor(got), torch.tensor(embed(TEXTS)), rtol=1e-5, atol=1e-6)
        with tp.replicate(pool, search_archive) as model:
            hits = model("How do I serve a model on many machines?", 2)
            assert [h["text"] for h in hits] == [h["text"] for h in search("How do I serve a model on many machines?",
                                                                          2)]
            assert hits[0]["text"].startswith("Ray Serve scales") and hits[0]["score"] > hits[1]["score"] > 0.2
            with pytest.raises(ValueError, match=r"input 1 \('k'\) must be int \(>= 1, <= 24\)"):
                model("a query", 0)
