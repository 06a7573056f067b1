"""tenfold.packaging in one process: save, load (zero copy), validation errors, interop, read-only weights."""

from __future__ import annotations

import io
import json
import signal
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from testmodels.packaging_models import AlwaysWrites, TwoInputs, WritesOnLargeInput, small
from torch.package import PackageExporter, PackageImporter

import tenfold.packaging as tp
from tenfold.packaging.manifest import MANIFEST_RECORD, content_digest

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pk") / "small.pt"
    tp.save(small, path, example_inputs=(X,))
    return path


def rewrite(src: Path, dst: Path, change: dict[str, bytes | None]) -> Path:
    """Copy a zip, replacing (bytes) or dropping (None) records named relative to the archive's folder."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/")[0] + "/"
        for info in zin.infolist():
            name = info.filename[len(prefix):]
            data = change.get(name, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
    return dst


def manifest_json(path: Path) -> dict:
    return json.loads(tp.read_manifest(path).model_dump_json())


def inside(ptr: int, base: int, size: int) -> bool:
    return base <= ptr < base + size


# -- save and the manifest ------------------------------------------------------------------------


def test_manifest_records_signature_versions_and_weights(archive: Path) -> None:
    m = tp.read_manifest(archive)
    assert m.name == "Small" and m.entry == "model/model.pkl"
    assert m.inputs == [tp.TensorSpec(name="x", dtype="float32", shape=[None, 8])]
    assert m.outputs == [tp.TensorSpec(name="output", dtype="float32", shape=[None, 4])]
    assert m.torch_version == torch.__version__
    assert m.python_version == ".".join(map(str, sys.version_info[:3]))
    assert "testmodels.packaging_models" in m.interned_modules and "torch" in m.extern_modules
    params = small().state_dict()
    assert m.weight_bytes == sum(t.numel() * t.element_size() for t in params.values())
    assert m.tensor_count == len(params)
    assert m.content_sha256 == content_digest(m)
    assert m.reference is not None and m.writes_weights == []


def test_signature_names_dtypes_dynamic_dims_and_dict_outputs(tmp_path: Path) -> None:
    tokens, scale = torch.randint(0, 50, (2, 7)), torch.ones(2, 1, dtype=torch.float64).float()
    m = tp.save(TwoInputs(), tmp_path / "two.pt", example_inputs=(tokens, scale), dynamic={"tokens": [0, 1]})
    assert [s.describe() for s in m.inputs] == ["tokens: int64[?, ?]", "scale: float32[2, 1]"]
    assert m.output_structure == "dict" and [s.name for s in m.outputs] == ["logits", "hidden"]
    out = tp.load(tmp_path / "two.pt")(tokens, scale)
    plain = _reload_plain(tmp_path / "two.pt")(tokens, scale)
    assert torch.equal(out["logits"], plain["logits"]) and torch.equal(out["hidden"], plain["hidden"])


def _reload_plain(path: Path) -> torch.nn.Module:
    return PackageImporter(str(path)).load_pickle("model", "model.pkl").eval()


def test_save_rejects_bad_example_inputs_and_failing_models(tmp_path: Path) -> None:
    with pytest.raises(tp.PackagingFailed, match="input 'x' is hinted Tensor, but its example is a list"):
        tp.save(small(), tmp_path / "a.pt", example_inputs=([1, 2],))
    with pytest.raises(TypeError, match="tuple of the call's positional arguments"):
        tp.save(small(), tmp_path / "a.pt", example_inputs=np.zeros(3))
    with pytest.raises(tp.PackagingFailed, match="failed on example_inputs") as e:
        tp.save(small(), tmp_path / "a.pt", example_inputs=(torch.randn(2, 5),))
    assert str(tmp_path / "a.pt") in str(e.value)
    with pytest.raises(tp.PackagingFailed, match=r"dynamic names inputs that are not tensors or arrays \['nope'\]"):
        tp.save(small(), tmp_path / "a.pt", example_inputs=(X,), dynamic={"nope": [0]})
    with pytest.raises(TypeError, match="not a int"):
        tp.save(3, tmp_path / "a.pt", example_inputs=(X,))
    assert not list(tmp_path.iterdir()), "a failed save leaves no file behind"


def test_installed_dependencies_are_extern_and_recorded_as_requirements(tmp_path: Path) -> None:
    m = tp.save(_module_with_numpy(tmp_path), tmp_path / "a.pt", example_inputs=(X,))
    assert "numpy" in m.extern_modules and "_uses_numpy" in m.interned_modules
    assert f"numpy=={np.__version__}" in m.requirements and f"torch=={torch.__version__.split('+')[0]}" in [
        r.split("+")[0] for r in m.requirements]


def test_save_names_the_module_it_cannot_package_and_the_argument_that_fixes_it(tmp_path: Path) -> None:
    import types

    made_up = types.ModuleType("tenfold_made_up")  # no file, no distribution: nothing tells where it comes from
    exec("import torch\nclass Twice(torch.nn.Module):\n    def forward(self, x):\n        return 2 * x\n",
         made_up.__dict__)
    made_up.Twice.__module__ = "tenfold_made_up"
    sys.modules["tenfold_made_up"] = made_up
    try:
        with pytest.raises(tp.PackagingFailed) as e:
            tp.save(made_up.Twice(), tmp_path / "a.pt", example_inputs=(X,))
        assert "module tenfold_made_up: Module did not match" in str(e.value)
        assert "extern=['tenfold_made_up'] to take it from the serving environment" in str(e.value)
        assert "--extern" in str(e.value)
        with pytest.raises(tp.PackagingFailed) as e:
            tp.save(made_up.Twice(), tmp_path / "a.pt", example_inputs=(X,), mock=["tenfold_made_up"])
        assert "intern=['tenfold_made_up'] or extern=['tenfold_made_up'] instead of mocking it" in str(e.value)
        m = tp.save(made_up.Twice(), tmp_path / "a.pt", example_inputs=(X,), extern=["tenfold_made_up"])
        assert "tenfold_made_up" in m.extern_modules
    finally:
        del sys.modules["tenfold_made_up"]


def _module_with_numpy(tmp_path: Path) -> torch.nn.Module:
    (tmp_path / "_uses_numpy.py").write_text(textwrap.dedent("""
        import numpy
        import torch
        class M(torch.nn.Module):
            def forward(self, x):
                return x * float(numpy.float32(2))
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import _uses_numpy
    finally:
        sys.path.remove(str(tmp_path))
    return _uses_numpy.M()


# -- load: round trip, zero copy, sources ----------------------------------------------------------


def test_load_round_trip_from_path_bytes_and_numpy(archive: Path) -> None:
    want = small()(X)
    data = archive.read_bytes()
    for source in (archive, str(archive), data, memoryview(data), np.frombuffer(data, dtype=np.uint8)):
        model = tp.load(source, verify=True)
        assert not model.training
        assert torch.equal(model(X), want)


def test_weights_are_views_into_a_buffer_source(archive: Path) -> None:
    arr = np.frombuffer(archive.read_bytes(), dtype=np.uint8)
    model = tp.load(arr)
    base = arr.ctypes.data
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(inside(t.data_ptr(), base, arr.nbytes) for t in tensors)


def test_weights_of_a_path_source_lie_in_its_read_only_mapping(archive: Path) -> None:
    model = tp.load(archive)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(archive.resolve()):
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            ranges.append((lo, hi, parts[1]))
    assert ranges, "the archive is memory-mapped"
    for t in list(model.parameters()) + list(model.buffers()):
        hit = [r for r in ranges if r[0] <= t.data_ptr() < r[1]]
        assert hit and hit[0][2].startswith("r-"), "weights lie in a read-only mapping of the file"


def test_copy_weights_gives_private_writable_copies(archive: Path) -> None:
    arr = np.frombuffer(bytearray(archive.read_bytes()), dtype=np.uint8)
    before = arr.copy()
    model = tp.load(arr, copy_weights=True)
    base = arr.ctypes.data
    assert not any(inside(p.data_ptr(), base, arr.nbytes) for p in model.parameters())
    with torch.no_grad():
        model.l1.bias.add_(1.0)
    assert np.array_equal(arr, before)
    assert torch.equal(tp.load(arr)(X), small()(X))


# -- read-only shared weights ----------------------------------------------------------------------


def test_model_that_writes_its_weights_is_refused_unless_copied(tmp_path: Path) -> None:
    path = tmp_path / "writes.pt"
    with pytest.warns(UserWarning, match="changed calls"):
        m = tp.save(AlwaysWrites(), path, example_inputs=(X,))
    assert m.writes_weights == ["calls"]
    with pytest.raises(tp.SharedWeightWrite, match="copy_weights=True") as e:
        tp.load(path)
    assert str(path) in str(e.value) and "calls" in str(e.value)
    model = tp.load(path, copy_weights=True)
    model(X)
    assert model.calls.item() == 2  # 1 from packaging, 1 now: private and writable


def test_write_at_inference_into_shared_weights_raises(tmp_path: Path) -> None:
    path = tmp_path / "sometimes.pt"
    tp.save(WritesOnLargeInput(), path, example_inputs=(X,))
    model = tp.load(bytearray(path.read_bytes()))
    model(X)
    for mode in (torch.no_grad, torch.inference_mode):  # a caller's inference mode does not lift the guard
        with mode(), pytest.raises(RuntimeError, match="inference tensor") as e:
            model(X + 1000)
        if sys.version_info >= (3, 11):
            assert any("copy_weights=True" in n for n in e.value.__notes__)


def test_write_into_a_mapped_archive_faults_instead_of_changing_it(tmp_path: Path) -> None:
    path = tmp_path / "sometimes.pt"
    tp.save(WritesOnLargeInput(), path, example_inputs=(X,))
    digest = tp.archive_sha256(path)
    code = f"""
import torch, tenfold.packaging as tp
m = tp.load({str(path)!r})
assert torch.equal(m(torch.zeros(1, 8)), m(torch.zeros(1, 8)))  # loaded, and it runs
print("WRITING", flush=True)
with torch.no_grad():
    m.l1.bias.data.add_(1.0)  # an alias torch does not guard
print("WROTE", flush=True)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # Everything up to the write worked; the write itself killed the process with a memory fault.
    assert run.stdout.splitlines() == ["WRITING"], run.stdout + run.stderr[-2000:]
    assert run.returncode in (-signal.SIGSEGV, -signal.SIGBUS), (run.returncode, run.stderr[-2000:])
    assert tp.archive_sha256(path) == digest


# -- errors ---------------------------------------------------------------------------------------


def test_not_a_zip(tmp_path: Path) -> None:
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"this is not a zip archive" * 10)
    for call in (tp.load, tp.read_manifest, tp.verify_archive):
        with pytest.raises(tp.NotAnArchive, match="not a zip archive") as e:
            call(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(tp.NotAnArchive, match="empty"):
        (tmp_path / "empty.pt").write_bytes(b"")
        tp.load(tmp_path / "empty.pt")


def test_truncated(archive: Path, tmp_path: Path) -> None:
    data = archive.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        with pytest.raises(tp.NotAnArchive, match="truncated") as e:
            tp.load(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(tp.NotAnArchive, match="truncated"):
        tp.load(data[: len(data) // 2])


def test_manifest_missing(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    with PackageExporter(str(plain)) as exp:
        exp.intern("testmodels.**")
        exp.save_pickle("model", "model.pkl", small())
    for call in (tp.load, tp.read_manifest, tp.verify_archive):
        with pytest.raises(tp.ManifestMissing, match="resource='model/model.pkl'") as e:
            call(plain)
        assert str(plain) in str(e.value)


def test_manifest_not_valid(archive: Path, tmp_path: Path) -> None:
    for i, bad_json in enumerate((b"{not json", json.dumps({"name": "x"}).encode())):
        bad = rewrite(archive, tmp_path / f"bad{i}.pt", {MANIFEST_RECORD: bad_json})
        with pytest.raises(tp.ManifestInvalid, match="manifest.json is invalid") as e:
            tp.load(bad)
        assert str(bad) in str(e.value)


def test_flipped_weight_byte_is_a_digest_mismatch(archive: Path, tmp_path: Path) -> None:
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".data/0.storage"))
    local = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[local + 26 : local + 30])
    start = local + 30 + name_len + extra_len
    data[start + 3] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(tp.DigestMismatch, match=r"\.data/0\.storage changed") as e:
        tp.verify_archive(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(tp.DigestMismatch):
        tp.load(bad, verify=True)
    tp.load(bad)  # unverified loading does not read every byte


def test_edited_manifest_is_a_digest_mismatch(archive: Path, tmp_path: Path) -> None:
    fields = manifest_json(archive)
    fields["inputs"][0]["shape"] = [None, 9]
    bad = rewrite(archive, tmp_path / "edited.pt", {MANIFEST_RECORD: json.dumps(fields).encode()})
    with pytest.raises(tp.DigestMismatch, match="manifest.json was edited") as e:
        tp.verify_archive(bad)
    assert str(bad) in str(e.value)


def test_added_record_is_a_digest_mismatch(archive: Path, tmp_path: Path) -> None:
    bad = rewrite(archive, tmp_path / "added.pt", {})
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr(zf.namelist()[0].split("/")[0] + "/extra/evil.py", b"import os")
    with pytest.raises(tp.DigestMismatch, match="extra/evil.py added"):
        tp.verify_archive(bad)


def test_pinned_sha256(archive: Path) -> None:
    good = tp.archive_sha256(archive)
    assert good == __import__("hashlib").sha256(archive.read_bytes()).hexdigest()
    tp.load(archive, sha256=good)
    tp.verify_archive(archive, sha256=good.upper())
    wrong = "0" * 64
    for call in (tp.load, tp.verify_archive):
        with pytest.raises(tp.PinMismatch, match=f"sha256 is {good}, but {wrong} was pinned") as e:
            call(archive, sha256=wrong)
        assert str(archive) in str(e.value)


def test_extern_not_importable(tmp_path: Path) -> None:
    (tmp_path / "_ext_dep.py").write_text("SCALE = 3.0\n")
    (tmp_path / "_ext_user.py").write_text(textwrap.dedent("""
        import torch
        import _ext_dep
        class M(torch.nn.Module):
            def forward(self, x):
                return x * _ext_dep.SCALE
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import _ext_user

        path = tmp_path / "ext.pt"
        m = tp.save(_ext_user.M(), path, example_inputs=(X,), extern=["_ext_dep"])
        assert "_ext_dep" in m.extern_modules
        assert torch.equal(tp.load(path)(X), X * 3)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("_ext_dep", None)
        sys.modules.pop("_ext_user", None)
    for call in (tp.load, tp.verify_archive):
        with pytest.raises(tp.ExternMissing, match="_ext_dep") as e:
            call(path)
        assert str(path) in str(e.value) and "install" in str(e.value)


def test_entry_point_missing(archive: Path, tmp_path: Path) -> None:
    with pytest.raises(tp.EntryPointMissing, match="'model/nope.pkl' is not in the archive") as e:
        tp.load(archive, resource="model/nope.pkl")
    assert str(archive) in str(e.value) and "model/model.pkl" in str(e.value)
    fields = manifest_json(archive)
    fields["entry"] = "model/gone.pkl"
    fields["content_sha256"] = content_digest(tp.Manifest.model_validate(fields))
    bad = rewrite(archive, tmp_path / "noentry.pt", {MANIFEST_RECORD: json.dumps(fields).encode()})
    with pytest.raises(tp.EntryPointMissing, match="gone.pkl"):
        tp.load(bad)


def test_torch_major_minor_mismatch_warns(archive: Path, tmp_path: Path) -> None:
    fields = manifest_json(archive)
    fields["torch_version"] = "1.13.1"
    fields["content_sha256"] = content_digest(tp.Manifest.model_validate(fields))
    other = rewrite(archive, tmp_path / "old.pt", {MANIFEST_RECORD: json.dumps(fields).encode()})
    with pytest.warns(tp.TorchVersionWarning, match="packaged with torch 1.13.1") as rec:
        model = tp.load(other, verify=True)
    assert str(other) in str(rec[0].message)
    assert torch.equal(model(X), small()(X))
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.TorchVersionWarning)
        tp.load(archive)  # same major.minor: no warning


def test_reference_mismatch_at_verify(archive: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        prefix = zf.namelist()[0].split("/")[0] + "/"
        ref = torch.load(io.BytesIO(zf.read(prefix + "tenfold/reference.pt")), weights_only=True)
    ref["output"] = ref["output"] + 1
    buf = io.BytesIO()
    torch.save(ref, buf)
    fields = manifest_json(archive)
    fields["record_sha256"]["tenfold/reference.pt"] = __import__("hashlib").sha256(buf.getvalue()).hexdigest()
    fields["content_sha256"] = content_digest(tp.Manifest.model_validate(fields))
    bad = rewrite(archive, tmp_path / "ref.pt",
                  {"tenfold/reference.pt": buf.getvalue(), MANIFEST_RECORD: json.dumps(fields).encode()})
    tp.verify_archive(bad)
    with pytest.raises(tp.ReferenceMismatch, match="differs from the one recorded") as e:
        tp.load(bad, verify=True)
    assert str(bad) in str(e.value)


def test_errors_are_package_errors_and_cross_pickle() -> None:
    import pickle

    for cls in (tp.NotAnArchive, tp.ManifestMissing, tp.ManifestInvalid, tp.DigestMismatch, tp.PinMismatch,
                tp.ExternMissing, tp.EntryPointMissing, tp.ReferenceMismatch, tp.PackagingFailed,
                tp.SharedWeightWrite):
        err = pickle.loads(pickle.dumps(cls("m.pt", "it broke; do this")))
        assert isinstance(err, tp.PackageError) and type(err) is cls
        assert str(err) == "m.pt: it broke; do this" and err.archive == "m.pt"


# -- interop with plain torch.package ---------------------------------------------------------------


def test_plain_torch_package_loads_a_tenfold_archive(archive: Path) -> None:
    importer = PackageImporter(str(archive))
    model = importer.load_pickle("model", "model.pkl").eval()
    assert torch.equal(model(X), small()(X))
    assert json.loads(importer.zip_reader.get_record(MANIFEST_RECORD))["name"] == "Small"


def test_tenfold_loads_a_plain_torch_package_by_resource(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    with PackageExporter(str(plain)) as exp:
        exp.intern("testmodels.**")
        exp.save_pickle("nets", "small.pkl", small())
    model = tp.load(plain, resource="nets/small.pkl", verify=True)
    assert torch.equal(model(X), small()(X))
    arr = np.frombuffer(plain.read_bytes(), dtype=np.uint8)
    zero_copy = tp.load(arr, resource="nets/small.pkl")
    assert all(inside(p.data_ptr(), arr.ctypes.data, arr.nbytes) for p in zero_copy.parameters())
    out = tmp_path / "with_manifest.pt"
    m = tp.repackage(plain, out, resource="nets/small.pkl", example_inputs=(X,))
    assert m.name == "plain" and "testmodels.packaging_models" in m.interned_modules
    assert torch.equal(tp.load(out, verify=True)(X), small()(X))


def test_source_type_errors() -> None:
    with pytest.raises(TypeError, match="path or a bytes-like"):
        tp.load(12345)
    with pytest.raises(FileNotFoundError, match="no such archive"):
        tp.load("/nonexistent/model.pt")


def test_an_archive_in_the_previous_manifest_format_still_verifies_and_loads(archive: Path, tmp_path: Path) -> None:
    """Manifests written before Python-valued models (format 1: no spec kinds, no requirements) keep their digest."""
    doc = manifest_json(archive)
    del doc["requirements"]
    for spec in doc["inputs"] + doc["outputs"]:
        del spec["kind"], spec["array"]
    doc["format_version"] = 1
    doc["content_sha256"] = content_digest(doc)
    old = rewrite(archive, tmp_path / "old.pt", {MANIFEST_RECORD: json.dumps(doc).encode()})
    m = tp.verify_archive(old)
    assert m.format_version == 1 and m.requirements == [] and m.inputs[0].kind == "tensor"
    torch.testing.assert_close(tp.load(old, verify=True)(X), small()(X))
