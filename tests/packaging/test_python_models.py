"""Archives of any Python callable: Python values in and out, a typed signature, dependencies taken from the
environment by default and their versions checked."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from support import run_python, subprocess_env
from testmodels import value_models
from testmodels.value_models import Keywords, Settings, Thresholds, Unhinted

import tenfold.packaging as tp
from tenfold.packaging.manifest import MANIFEST_RECORD, content_digest
from tenfold.runtime import InterpreterPool

TEXTS = ["serve a python model", "fast fast model"]


@pytest.fixture(scope="module")
def keywords_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "keywords.pt"
    tp.save(value_models.keywords, path, example_inputs=(TEXTS, "sum"))  # a factory: called to make the model
    return path


@pytest.fixture(scope="module")
def pool() -> Iterator[InterpreterPool]:
    with InterpreterPool(2, threads_per_interpreter=1) as p:
        yield p


# -- any callable ----------------------------------------------------------------------------------


def test_an_object_with_call_and_hints_records_json_schemas_from_its_hints(keywords_archive: Path) -> None:
    m = tp.read_manifest(keywords_archive)
    assert m.signature() == "(texts: list[str], mode: Literal['sum', 'max']) -> dict[str, float]"
    texts, mode = m.inputs
    assert isinstance(texts, tp.ValueSpec) and texts.hinted
    assert texts.json_schema == {"type": "array", "items": {"type": "string"}}
    assert mode.json_schema == {"enum": ["sum", "max"], "type": "string"}
    assert m.output_structure == "value"
    assert m.outputs[0].json_schema == {"type": "object", "additionalProperties": {"type": "number"}}


def test_load_gives_back_the_same_kind_of_object_taking_the_same_values(keywords_archive: Path) -> None:
    model = tp.load(keywords_archive, verify=True)  # verify re-runs the stored example and compares
    assert type(model).__name__ == "Keywords" and not isinstance(model, torch.nn.Module)
    assert model(TEXTS, "max") == Keywords()(TEXTS, "max")
    # Tensors a plain object holds are weights too: shared read-only views, as a module's are.
    assert torch.equal(model.weights, Keywords().weights) and model.weights.is_inference()


def test_a_class_is_a_factory_and_a_module_is_the_model(tmp_path: Path) -> None:
    m = tp.save(Keywords, tmp_path / "k.pt", example_inputs=(TEXTS, "max"))
    assert m.name == "Keywords"
    linear = torch.nn.Linear(3, 2)
    m = tp.save(linear, tmp_path / "l.pt", example_inputs=torch.zeros(1, 3))  # one tensor is a one-tuple
    assert m.output_structure == "tensor" and isinstance(tp.load(tmp_path / "l.pt"), torch.nn.Linear)
    with pytest.raises(TypeError, match="returned a int, which cannot be called"):
        tp.save(lambda: 3, tmp_path / "x.pt", example_inputs=())


def test_a_function_that_takes_the_inputs_is_the_model_and_one_that_takes_none_a_factory(tmp_path: Path) -> None:
    (tmp_path / "_functions.py").write_text(textwrap.dedent("""
        def shout(text: str, times: int = 1) -> str:
            return text.upper() * times

        def make():
            return shout
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import _functions

        direct = tp.save(_functions.shout, tmp_path / "direct.pt", example_inputs=("hi",))
        made = tp.save(_functions.make, tmp_path / "made.pt", example_inputs=("hi", 2))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("_functions", None)
    assert direct.name == made.name == "shout"  # a function is named for itself, not for its type
    assert direct.signature() == "(text: str) -> str" and made.signature() == "(text: str, times: int) -> str"
    assert tp.load(tmp_path / "direct.pt")("hi") == "HI" and tp.load(tmp_path / "made.pt")("hi", 2) == "HIHI"


def test_without_hints_the_signature_is_inferred_from_the_example_values(tmp_path: Path) -> None:
    example = ([1, 2.5], "abc", b"\x00\x01", {"a": 1, "b": 2})
    m = tp.save(Unhinted(), tmp_path / "u.pt", example_inputs=example)
    items, label, blob, table = m.inputs
    assert (items.type, label.type, blob.type, table.type) == ("list[float]", "str", "bytes", "dict[str, int]")
    assert not any(s.hinted for s in m.inputs)
    assert blob.json_schema == {"type": "string", "contentEncoding": "base64"}
    with InterpreterPool(1) as pool, tp.replicate(pool, tmp_path / "u.pt") as model:
        out = model(*example)
        assert out["label"] == "ABC" and out["total"] == 7.0 and out["size"] == 2 and out["columns"] == ["a", "b"]
        assert np.array_equal(out["array"], np.arange(3)) and out["scalar"] == np.float32(0.5)
        with pytest.raises(ValueError, match=r"input 1 \('label'\) must be str; 3 is not of type 'string'"):
            model([1], 3, b"", {})
        with pytest.raises(ValueError, match=r"input 3 \('table'\) must be dict\[str, int\]; at \['x'\]"):
            model([1], "a", b"", {"x": "not an int"})


def test_tensors_and_pydantic_models_mix_in_one_signature(tmp_path: Path) -> None:
    settings = Settings(threshold=0.5, labels=["a", "b", "c"])
    m = tp.save(Thresholds(), tmp_path / "t.pt", example_inputs=(torch.tensor([0.1, 0.7, 0.9]), settings))
    scores, settings_spec = m.inputs
    assert isinstance(scores, tp.TensorSpec) and scores.dtype == "float32"
    assert settings_spec.hinted and settings_spec.json_schema["required"] == ["threshold", "labels"]
    with InterpreterPool(1) as pool, tp.replicate(pool, tmp_path / "t.pt") as model:
        # A dict validates into the pydantic model inside the interpreter; a model instance crosses as well.
        assert model(torch.tensor([0.9, 0.1, 0.6]), {"threshold": 0.5, "labels": ["a", "b", "c"]}) == ["a", "c"]
        assert model(torch.tensor([0.9, 0.1, 0.6]), settings) == ["a", "c"]
        with pytest.raises(ValueError, match=r"input 1 \('settings'\) must be Settings; at \['threshold'\]"):
            model(torch.tensor([0.9, 0.1, 0.6]), {"threshold": "high", "labels": []})


def test_example_inputs_that_do_not_fit_the_hints_are_refused_at_packaging(tmp_path: Path) -> None:
    with pytest.raises(tp.PackagingFailed, match=r"input 1 \('mode'\) must be Literal\['sum', 'max'\]"):
        tp.save(Keywords(), tmp_path / "k.pt", example_inputs=(TEXTS, "mean"))
    with pytest.raises(TypeError, match="tuple of the call's positional arguments"):
        tp.save(Keywords(), tmp_path / "k.pt", example_inputs="one text")


# -- values in an interpreter ------------------------------------------------------------------------


def test_replicated_values_are_validated_in_the_interpreter_and_equal_the_host(pool: InterpreterPool,
                                                                               keywords_archive: Path) -> None:
    with tp.replicate(pool, keywords_archive) as model:
        assert model(TEXTS, "sum") == Keywords()(TEXTS, "sum")
        assert [f.result() for f in [model.submit(TEXTS, "max") for _ in range(4)]] == [Keywords()(TEXTS, "max")] * 4
        calls = pool.stats().calls
        for bad, message in (((3, "sum"), "input 0 ('texts') must be list[str]; Input should be a valid list"),
                             ((TEXTS, "mean"), "input 1 ('mode') must be Literal['sum', 'max']"),
                             (([1, 2], "sum"), "input 0 ('texts') must be list[str]; at [0]: Input should be")):
            with pytest.raises(ValueError) as info:
                model(*bad)
            assert message in str(info.value)
        assert pool.stats().calls == calls + 3, "checked where the model runs (the hints are the model's own)"
        assert model(TEXTS, "sum") == Keywords()(TEXTS, "sum")  # and it serves on


def test_validating_a_copy_of_the_same_schema_at_every_call_keeps_nothing_per_call() -> None:
    import copy
    import gc

    from tenfold.packaging import _values

    # Each call that crosses into an interpreter brings its own copy of the input's schema.
    schema = {"type": "array", "items": {"type": "string"}}
    for _ in range(50):
        _values.validate(copy.deepcopy(schema), TEXTS, "input 0 ('texts')", "list[str]")
    gc.collect()
    before = sys.getallocatedblocks()
    for _ in range(500):
        _values.validate(copy.deepcopy(schema), TEXTS, "input 0 ('texts')", "list[str]")
    gc.collect()
    assert sys.getallocatedblocks() - before < 200  # a validator kept per call held about 20 blocks each
    with pytest.raises(ValueError, match=r"input 0 \('texts'\) must be list\[str\]"):
        _values.validate(copy.deepcopy(schema), [1], "input 0 ('texts')", "list[str]")


def test_an_archive_of_python_values_loads_where_its_source_is_not_on_sys_path(keywords_archive: Path,
                                                                              tmp_path: Path) -> None:
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    run = run_python(f"""
        import importlib.util, sys
        import tenfold.packaging as tp
        from tenfold.runtime import InterpreterPool
        assert importlib.util.find_spec("testmodels") is None
        with InterpreterPool(1) as pool, tp.replicate(pool, {str(keywords_archive)!r}) as model:
            assert pool.submit(importlib.util.find_spec, "testmodels").result() is None
            print(model({TEXTS!r}, "sum"))
    """, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str(Keywords()(TEXTS, "sum"))


# -- dependencies --------------------------------------------------------------------------------------


def test_only_the_users_code_is_interned_and_installed_distributions_are_required(keywords_archive: Path) -> None:
    m = tp.read_manifest(keywords_archive)
    assert m.interned_modules == ["testmodels.value_models"]
    for extern in ("numpy", "pydantic", "torch"):
        assert any(e == extern or e.startswith(extern + ".") for e in m.extern_modules), extern
    required = dict(r.split("==") for r in m.requirements)
    assert required["numpy"] == np.__version__ and required["pydantic"] == pydantic.VERSION
    assert required["torch"] == torch.__version__
    assert "testmodels" not in required and "tenfold" not in required
    assert set(required) <= {"numpy", "pydantic", "torch", "typing_extensions", "pydantic_core", "annotated-types"}


_BUILD_ONLY = """
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy

if TYPE_CHECKING:
    import requests


class Scaler:
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, values: list[float]) -> list[float]:
        import jsonschema  # imported when the model runs: needed to serve

        jsonschema.validate(values, {"type": "array"})
        return [float(v) for v in numpy.asarray(values) * self.factor]


def build() -> Scaler:
    import tqdm  # only where the factor comes from: needed to build, not to serve

    return Scaler(2.0 if tqdm else 1.0)
"""


def test_a_distribution_imported_only_while_building_is_not_required(tmp_path: Path) -> None:
    (tmp_path / "_build_only.py").write_text(_BUILD_ONLY)
    sys.path.insert(0, str(tmp_path))
    try:
        import _build_only

        m = tp.save(_build_only.build, tmp_path / "s.pt", example_inputs=([1.0, 2.0],))
        pinned = tp.save(_build_only.build, tmp_path / "pinned.pt", example_inputs=([1.0],), extern=["tqdm"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("_build_only", None)
    required = {r.split("==")[0] for r in m.requirements}
    assert {"numpy", "jsonschema"} <= required, "imported at the module's top and by the call"
    assert not {"tqdm", "requests"} & required, "imported only by the factory, and only for type checking"
    assert "tqdm" not in m.extern_modules and "requests" not in m.extern_modules
    # torch.package still lists them, so that code that does import them finds them where they are installed.
    archive = tp.open_archive(tmp_path / "s.pt")
    assert {"tqdm", "requests"} <= set(archive.extern_modules())
    assert archive.optional_externs() == ["requests", "tqdm"]
    del archive
    assert "tqdm" in {r.split("==")[0] for r in pinned.requirements}, "a module named in extern= is required"
    run = run_python(f"""
        import importlib.abc, sys

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("tqdm", "requests"):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Absent())
        import tenfold.packaging as tp
        print(tp.load({str(tmp_path / 's.pt')!r}, verify=True)([1.5]))
        try:
            tp.load({str(tmp_path / 'pinned.pt')!r})
        except tp.ExternMissing as exc:
            print("refused:", exc)
    """, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded, refused = run.stdout.strip().splitlines()
    assert loaded == "[3.0]"
    assert refused.startswith("refused:") and "tqdm" in refused


def test_eager_imports_are_those_a_module_runs_as_it_is_imported() -> None:
    from tenfold.packaging import _dependencies

    source = textwrap.dedent("""
        import a
        from .sibling import b
        from . import c
        from typing import TYPE_CHECKING
        try:
            import d
        except ImportError:
            d = None
        if TYPE_CHECKING:
            import typed_only
        else:
            import e
        class K:
            import f
            def method(self):
                import lazy_in_method
            def __setstate__(self, state):
                import g
        def factory():
            import lazy_in_function
        scale = lambda: __import__("lazy_in_lambda")
    """)
    pairs = _dependencies.eager_imports(source, "pkg.mod", is_package=False)
    assert pairs == [("a", None), ("pkg.sibling", "b"), ("pkg", "c"), ("typing", "TYPE_CHECKING"), ("d", None),
                     ("e", None), ("f", None), ("g", None)]


def _with_requirements(src: Path, dst: Path, requirements: list[str]) -> Path:
    """A copy of `src` whose manifest lists `requirements` (its content digest recomputed, as a packager would)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/" + MANIFEST_RECORD):
                manifest = tp.Manifest.model_validate_json(data)
                manifest.requirements = requirements
                manifest.content_sha256 = content_digest(manifest)
                data = manifest.model_dump_json().encode()
            zout.writestr(info, data)
    return dst


def test_a_missing_requirement_is_refused_by_name(keywords_archive: Path, tmp_path: Path,
                                                  pool: InterpreterPool) -> None:
    bad = _with_requirements(keywords_archive, tmp_path / "missing.pt", ["tenfold-no-such-dist==1.0"])
    for call in (lambda: tp.load(bad), lambda: tp.replicate(pool, bad), lambda: tp.verify_archive(bad)):
        with pytest.raises(tp.ExternMissing, match="tenfold-no-such-dist==1.0, not installed here; install it") as e:
            call()
        assert str(bad) in str(e.value)


def test_a_changed_requirement_warns_or_is_refused_when_strict(keywords_archive: Path, tmp_path: Path) -> None:
    changed = _with_requirements(keywords_archive, tmp_path / "changed.pt", [f"numpy=={np.__version__}.post99"])
    with pytest.warns(tp.RequirementWarning, match=rf"numpy {np.__version__} is installed, {np.__version__}.post99"):
        model = tp.load(changed)
    assert model(TEXTS, "sum") == Keywords()(TEXTS, "sum")
    with pytest.raises(tp.RequirementMismatch, match="install the packaged versions"):
        tp.load(changed, strict_requirements=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.load(keywords_archive)  # the archive as packaged: nothing to say


def test_inspect_lists_the_requirements(keywords_archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tenfold import cli

    assert cli.main(["inspect", str(keywords_archive)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("requires"))
    assert f"numpy=={np.__version__}" in line and f"pydantic=={pydantic.VERSION}" in line


def test_a_users_own_package_is_interned_even_when_installed_in_editable_mode(tmp_path: Path) -> None:
    # An editable install leaves the project's files in the project, and may leave its metadata beside them.
    project = tmp_path / "project"
    (project / "mypkg").mkdir(parents=True)
    (project / "mypkg" / "__init__.py").write_text(textwrap.dedent("""
        class Doubler:
            def __call__(self, x: list[float]) -> list[float]:
                return [2 * v for v in x]
    """))
    info = project / "mypkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (info / "top_level.txt").write_text("mypkg\n")
    (info / "RECORD").write_text("")
    run = run_python(f"""
        import sys
        sys.path.insert(0, {str(project)!r})
        import mypkg, tenfold.packaging as tp
        m = tp.save(mypkg.Doubler(), {str(tmp_path / 'd.pt')!r}, example_inputs=([1.0],))
        print(m.interned_modules, m.requirements)
    """, cwd=project)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "['mypkg'] []"


def test_manifest_json_of_a_value_model_is_readable_by_other_tools(keywords_archive: Path) -> None:
    with zipfile.ZipFile(keywords_archive) as zf:
        name = next(n for n in zf.namelist() if n.endswith(MANIFEST_RECORD))
        doc = json.loads(zf.read(name))
    assert doc["inputs"][0] == {"kind": "value", "name": "texts", "type": "list[str]",
                                "json_schema": {"items": {"type": "string"}, "type": "array"}, "hinted": True}
    assert sys.version.split()[0] == doc["python_version"]


def test_an_exception_class_of_the_archive_comes_back_as_a_remote_error_naming_it(pool: InterpreterPool,
                                                                                   tmp_path: Path) -> None:
    from tenfold.runtime import RemoteError

    tp.save(value_models.Refuser(), tmp_path / "r.pt", example_inputs=("hello",))
    with tp.replicate(pool, tmp_path / "r.pt") as model:
        assert model("hello") == "HELLO"
        with pytest.raises(RemoteError) as info:  # its class lives in the archive, not in this process
            model("a rude text")
        assert info.value.remote_type.endswith("testmodels.value_models.Refusal")
        assert "will not answer 'a rude text'" in info.value.remote_message and "in __call__" in str(info.value)
        assert model("again") == "AGAIN"
