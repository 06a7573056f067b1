"""`tenfold package` and `tenfold inspect`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any


def add_commands(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "package",
        help="package a model as a torch.package archive with a manifest",
        description="Package MODULE:FACTORY (a zero-argument function returning a torch.nn.Module, or a module "
        "object) into an archive. Without --example-input, MODULE's example_inputs() is used; MODULE's DYNAMIC "
        "dict (input name -> dims) marks the dimensions that vary (default: the batch dimension).",
    )
    p.add_argument("target", nargs="?", metavar="MODULE:FACTORY", help="e.g. examples.resnet:build")
    p.add_argument("-o", "--output", required=True, help="archive to write, e.g. model.pt")
    p.add_argument("--example-input", action="append", default=[], metavar="SHAPE:DTYPE",
                   help="one input per option, e.g. 1x3x32x32:float32 (floats: normal noise; integers: 0..9)")
    p.add_argument("--dynamic", action="append", default=[], metavar="NAME:DIMS",
                   help="dimensions of input NAME that vary, e.g. tokens:0,1 (default: dimension 0)")
    p.add_argument("--name", help="model name in the manifest (default: the model's class name)")
    p.add_argument("--intern", action="append", default=[], metavar="PATTERN", help="extra modules to intern")
    p.add_argument("--extern", action="append", default=[], metavar="PATTERN", help="modules to take from the server")
    p.add_argument("--mock", action="append", default=[], metavar="PATTERN", help="modules to replace by mocks")
    p.add_argument("--from-torch-package", metavar="ARCHIVE", help="add a manifest to a plain torch.package archive")
    p.add_argument("--resource", default="model/model.pkl", help="the pickle to load with --from-torch-package")
    p.set_defaults(handler=_package)

    p = commands.add_parser("inspect", help="print an archive's manifest and check its digests")
    p.add_argument("archive")
    p.set_defaults(handler=_inspect)

    p = bench.add_parser("packaging", help="package/load times and memory of one archive shared by 4 interpreters")
    p.add_argument("--weights-mb", type=int, default=200, help="weights of the archive shared by the interpreters")
    p.add_argument("--interpreters", type=int, default=4)
    p.set_defaults(handler=_bench)


def parse_example_input(text: str, seed: int) -> Any:
    """'1x3x32x32:float32' -> a tensor of that shape and dtype (seeded)."""
    import torch

    shape_text, _, dtype_text = text.rpartition(":")
    if not shape_text:
        raise ValueError(f"--example-input {text!r}: expected SHAPE:DTYPE, e.g. 1x3x32x32:float32")
    dtype = getattr(torch, dtype_text, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--example-input {text!r}: unknown dtype {dtype_text!r} (e.g. float32, int64)")
    try:
        shape = [int(d) for d in shape_text.split("x")]
    except ValueError:
        raise ValueError(f"--example-input {text!r}: shape must be sizes joined by x, e.g. 2x16") from None
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 10, shape, generator=g).to(dtype)


def _dynamic(items: list[str]) -> dict[str, tuple[int, ...]] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, _, dims = item.partition(":")
        try:
            out[name] = tuple(int(d) for d in dims.split(",") if d)
        except ValueError:
            raise ValueError(f"--dynamic {item!r}: expected NAME:DIMS, e.g. tokens:0,1") from None
    return out


def _package(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import repackage, save
    from .errors import PackageError

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: MODULE may live in the current directory
    try:
        inputs = tuple(parse_example_input(t, seed=i) for i, t in enumerate(args.example_input))
        dynamic = _dynamic(args.dynamic)
        if args.from_torch_package:
            if not inputs:
                print("tenfold package: --from-torch-package needs --example-input", file=sys.stderr)
                return 2
            with _bar(tqdm, None) as bar:
                manifest = repackage(args.from_torch_package, args.output, resource=args.resource,
                                     example_inputs=inputs, name=args.name, dynamic=dynamic, progress=bar.update)
        else:
            if not args.target or ":" not in args.target:
                print("tenfold package: give MODULE:FACTORY (or --from-torch-package ARCHIVE)", file=sys.stderr)
                return 2
            module_name, _, attr = args.target.partition(":")
            module = importlib.import_module(module_name)
            factory = getattr(module, attr)
            if not inputs:
                if not hasattr(module, "example_inputs"):
                    print(f"tenfold package: {module_name} has no example_inputs(); pass --example-input",
                          file=sys.stderr)
                    return 2
                inputs = tuple(module.example_inputs())
                if dynamic is None:
                    dynamic = getattr(module, "DYNAMIC", None)
            import torch

            model = factory if isinstance(factory, torch.nn.Module) else factory()
            total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            with _bar(tqdm, 2 * total) as bar:
                manifest = save(model, args.output, example_inputs=inputs, name=args.name, intern=args.intern,
                                extern=args.extern, mock=args.mock, dynamic=dynamic, progress=bar.update)
    except (PackageError, ValueError, TypeError, ImportError, AttributeError) as exc:
        print(f"tenfold package: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {manifest.name} {manifest.signature()}, "
          f"{manifest.tensor_count} tensors, {manifest.weight_bytes / 1e6:.1f} MB")
    return 0


class _bar:
    """A tqdm bar for writing and hashing the weights, shown only when they are large."""

    def __init__(self, tqdm: Any, total: int | None) -> None:
        self._bar = tqdm(total=total, unit="B", unit_scale=True, desc="packaging",
                         disable=total is not None and total < (32 << 20), leave=False)

    def __enter__(self) -> Any:
        return self._bar

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()


def _inspect(args: argparse.Namespace) -> int:
    from ._archive import Archive, open_source, sha256_of
    from .errors import ManifestMissing, PackageError
    from .reader import manifest_of, verify_archive

    try:
        view, label = open_source(args.archive)
        archive = Archive(view, label)
    except (PackageError, FileNotFoundError) as exc:
        print(f"tenfold inspect: {exc}", file=sys.stderr)
        return 1
    storages = archive.storages()
    print(f"archive   {label}")
    print(f"sha256    {sha256_of(view)}")
    print(f"tensors   {len(storages)} storages, {archive.weight_bytes():,} bytes")
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in archive.names()
                     if n.endswith(".py") and not n.startswith(".data/"))
    try:
        manifest = manifest_of(archive)
    except ManifestMissing as exc:
        print(f"manifest  none ({exc})")
        print(f"interned  {', '.join(modules) or '-'}")
        return 0
    except PackageError as exc:
        print(f"manifest  INVALID: {exc}")
        return 1
    print(f"name      {manifest.name}")
    print(f"entry     {manifest.entry}")
    print(f"signature {manifest.signature()}")
    print(f"torch     {manifest.torch_version} (python {manifest.python_version})")
    print(f"interned  {', '.join(manifest.interned_modules) or '-'}")
    print(f"extern    {', '.join(manifest.extern_modules) or '-'}")
    if manifest.mocked_modules:
        print(f"mocked    {', '.join(manifest.mocked_modules)}")
    if manifest.writes_weights:
        print(f"writes    {', '.join(manifest.writes_weights)} (needs copy_weights=True)")
    try:
        verify_archive(args.archive)
    except PackageError as exc:
        print(f"digest    FAILED: {exc}")
        return 1
    print(f"digest    ok ({manifest.content_sha256})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ._bench import run

    return run(weights_mb=args.weights_mb, interpreters=args.interpreters)
