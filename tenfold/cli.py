"""The `tenfold` command: every subcommand and its arguments are declared here.

    tenfold package MODULE:FACTORY -o model.pt     package a model as an archive
    tenfold inspect model.pt                       print its manifest, check its digests
    tenfold serve model.pt|MODULE:FACTORY          serve it with Ray Serve until Ctrl-C
    tenfold bench runtime|packaging|serve|dataplane|stream|update|models|soak   run a benchmark

Handlers import what they need (torch, ray) when they run, so that `tenfold --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: glibc allows 15 namespace interpreters per process.
_MAX_INTERPRETERS = 15


def main(argv: list[str] | None = None) -> int:
    if sys.platform.startswith("linux") and argv is None:
        _ensure_static_tls()
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    return int(handler(args) or 0)


def _ensure_static_tls() -> None:
    # glibc reads GLIBC_TUNABLES only at process start (docs/runtime-pitfalls.md, pitfall 3): set it and
    # start again.
    from tenfold.runtime import static_tls_ready, with_glibc_tunables

    if static_tls_ready() or os.environ.get("TENFOLD_REEXECED"):
        return  # ready, or the platform ignored it (not glibc): the runtime will say what is wrong
    env = with_glibc_tunables({**os.environ, "TENFOLD_REEXECED": "1"})
    os.execve(sys.executable, [sys.executable, "-m", "tenfold", *sys.argv[1:]], env)


# -- argument types -------------------------------------------------------------------------------


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def _interpreters(text: str) -> int:
    value = int(_positive(int)(text))
    if value > _MAX_INTERPRETERS:
        raise argparse.ArgumentTypeError(f"at most {_MAX_INTERPRETERS} interpreters fit in one process, got {value}")
    return value


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated integers, like 1,2; got {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > _MAX_INTERPRETERS:
        raise argparse.ArgumentTypeError(
            f"sizes must be between 1 and {_MAX_INTERPRETERS} (glibc allows {_MAX_INTERPRETERS} interpreters per "
            f"process); got {text!r}"
        )
    return sizes


def _runtime_models(text: str) -> list[str]:
    from tenfold.bench import runtime_models

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in runtime_models.MODELS]
    if not names or unknown:
        known = ", ".join(runtime_models.MODELS)
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; known: {known}")
    return names


# -- the parser -----------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tenfold")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from tenfold import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenfold", description="Serve Python models from several isolated interpreters per process."
    )
    parser.add_argument("--version", action="version", version=f"tenfold {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "package",
        help="package a model as a torch.package archive with a manifest",
        description="Package MODULE:FACTORY (a function or class called with no arguments to make the model, or "
        "the model itself: an object with __call__, or a function that takes the inputs) into an archive. The "
        "model runs once on example inputs: one --example-input per positional argument, or, without any, "
        "MODULE's example_inputs(). Each --example-input is a tensor spec SHAPE:DTYPE (e.g. 1x3x32x32:float32) "
        "or else a JSON value: --example-input '\"a text\"' --example-input '[\"pos\", \"neg\"]' (a string "
        "keeps its JSON quotes inside the shell's). MODULE's DYNAMIC dict (input name -> dims) marks the "
        "dimensions that vary (default: the batch dimension).",
    )
    p.add_argument("target", nargs="?", metavar="MODULE:FACTORY", help="e.g. examples.resnet:build")
    p.add_argument("-o", "--output", required=True, help="archive to write, e.g. model.pt")
    p.add_argument("--example-input", action="append", default=[], metavar="SHAPE:DTYPE|JSON",
                   help="one positional argument per option: a tensor, e.g. 1x3x32x32:float32 (floats: normal "
                   "noise; integers: 0..9), or any other text as JSON, e.g. '\"a text\"', '[\"pos\", \"neg\"]', 3")
    p.add_argument("--dynamic", action="append", default=[], metavar="NAME:DIMS",
                   help="dimensions of input NAME that vary, e.g. tokens:0,1 (default: dimension 0)")
    p.add_argument("--name", help="model name in the manifest (default: the model's class name)")
    p.add_argument("--intern", action="append", default=[], metavar="PATTERN", help="extra modules to intern")
    p.add_argument("--extern", action="append", default=[], metavar="PATTERN",
                   help="modules to take from the serving environment, and to require there")
    p.add_argument("--mock", action="append", default=[], metavar="PATTERN", help="modules to replace by mocks")
    p.add_argument("--from-torch-package", metavar="ARCHIVE", help="add a manifest to a plain torch.package archive")
    p.add_argument("--resource", default="model/model.pkl", help="the pickle to load with --from-torch-package")
    p.set_defaults(handler=_package)

    p = commands.add_parser("inspect", help="print an archive's manifest and check its digests")
    p.add_argument("archive")
    p.set_defaults(handler=_inspect)

    p = commands.add_parser(
        "serve",
        help="serve a model with Ray Serve (several interpreters per replica) until Ctrl-C",
        description="Serve MODEL: an archive, or MODULE:FACTORY (packaged to build/MODULE.pt first when the archive "
        "is missing or older than the module). Several MODELs are served as one application, each at /NAME (the "
        "archive's file name without .pt) and loaded on its first request. Starts a local Ray, prints how to call "
        "the model with curl and with a Python handle, and serves until Ctrl-C. For YAML configs use "
        "`serve run CONFIG.yaml`.",
    )
    p.add_argument("models", metavar="MODEL", nargs="+",
                   help="archive path, or MODULE:FACTORY (e.g. examples.rnn_tagger:build)")
    p.add_argument("--interpreters", type=_interpreters, default=2, help="interpreters per replica (default: 2)")
    p.add_argument("--replicas", type=_positive(int), default=1, help="replicas (default: 1)")
    p.add_argument("--backend", choices=("namespaces", "threads"), default="namespaces")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="Serve's HTTP proxy (default: 8000)")
    p.add_argument("--http-port", type=int, default=None,
                   help="the port the interpreters serve HTTP on themselves (default: --port + 1; 0: none)")
    p.add_argument("--sha256", help="refuse the archive unless its sha256 is this (one MODEL only)")
    p.add_argument("--name", help="the application's name (default: the archive's file name without .pt, or "
                   "'models' for several); its deployment is named for the model, as with app_builder")
    p.add_argument("--num-cpus", type=_positive(float), default=None,
                   help="CPUs reserved per replica (default: one per interpreter)")
    p.add_argument("--request-timeout-s", type=_positive(float), default=None,
                   help="a call running longer answers 504 (default: AppArgs', 30 s)")
    p.add_argument("--max-ongoing-requests", type=_positive(int), default=None,
                   help="requests a replica runs at once (default: 4 per interpreter)")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests waiting per caller before a 503 (default: -1, no limit)")
    p.add_argument("--max-request-bytes", type=_positive(int), default=None,
                   help="largest request body; larger ones answer 413 (default: AppArgs')")
    p.set_defaults(handler=_serve)

    bench = commands.add_parser(
        "bench", help="run a benchmark (runtime, packaging, serve, dataplane, stream, update, models, soak)"
    ).add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = bench.add_parser(
        "runtime",
        help="interpreters vs threads vs processes vs TorchScript: throughput, memory, start-up, round trip",
        description="Run the same models in N namespace interpreters, N threads of one interpreter, N processes "
        "and TorchScript driven by N threads; measure memory per interpreter, start-up and call round trip; "
        "check them against the runtime's targets; write runtime.json and runtime.png.",
    )
    p.add_argument("--sizes", type=_sizes, default=[1, 2], help="worker counts N to measure (default 1,2)")
    p.add_argument("--models", type=_runtime_models, default=None,
                   help="comma-separated subset of the benchmark's models (default all; mlp,conv with --quick)")
    p.add_argument("--seconds", type=_positive(float), default=None,
                   help="length of one throughput measurement (default 3; 0.3 with --quick)")
    p.add_argument("--reps", type=_positive(int), default=None,
                   help="repetitions per measurement, median reported (default 3; 1 with --quick)")
    p.add_argument("--round-trips", type=_positive(int), default=None,
                   help="calls timed for the round trip (default 20000; 2000 with --quick)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for runtime.json and runtime.png")
    p.add_argument("--quick", action="store_true", help="a smoke run in well under a minute; figures not for quoting")
    p.set_defaults(handler=_bench_runtime)

    p = bench.add_parser("packaging", help="package/load times and memory of one archive shared by 4 interpreters")
    p.add_argument("--weights-mb", type=_positive(int), default=200, help="weights of the shared archive (MB)")
    p.add_argument("--interpreters", type=_interpreters, default=4)
    p.set_defaults(handler=_bench("packaging"))

    p = bench.add_parser(
        "serve", help="memory, ready time and HTTP throughput: 1 replica x N interpreters vs N plain replicas",
        description="Deploy each example as tenfold (1 replica x N interpreters), plain Serve with memory-mapped "
        "weights (N replicas), plain Serve with private weights and the threads backend; measure the memory each "
        "adds to the machine, ready and scale-up times, then throughput and latency in interleaved rounds; write "
        "serve.json and serve.png.",
    )
    p.add_argument("--models", default="rnn_tagger,resnet,minilm_embedder",
                   help="examples (or archives) to serve, comma-separated")
    p.add_argument("--cost-models", default="wide_mlp,rnn_tagger,resnet,minilm_embedder",
                   help="examples (or archives) whose cost to measure (default: these four; none: no cost)")
    p.add_argument("--sizes", type=_sizes, default=[2, 4], help="N for the cost (default 2,4)")
    p.add_argument("--setups", default="tenfold,plain-mmap,plain-private,threads",
                   help="which of tenfold, plain-mmap, plain-private, threads, tenfold-batched to run")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds of load per set-up (0: cost only)")
    p.add_argument("--seconds", type=_positive(float), default=6.0, help="measured load per set-up and round")
    p.add_argument("--warmup-s", type=_positive(float), default=3.0, help="load before measuring")
    p.add_argument("--concurrency", type=_positive(int), default=8, help="requests outstanding at once")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for serve.json and serve.png")
    p.set_defaults(handler=_bench("serve"))

    p = bench.add_parser(
        "dataplane", help="requests served inside the interpreters (http_port) vs plain Serve and uvicorn processes",
        description="Serve each model on 2 CPUs as tenfold through http_port (1 replica x 2 interpreters), as 2 "
        "plain Serve replicas through the proxy and with direct ingress (RAY_SERVE_THROUGHPUT_OPTIMIZED=1), and "
        "as 2 uvicorn worker processes; load each with wrk (8 keep-alive connections) in interleaved rounds; "
        "print throughput, p99, CPU per request and the host's CPU per request; write dataplane.json and "
        "dataplane.png.",
    )
    p.add_argument("--models", default="echo,rnn_tagger,minilm_embedder", help="comma-separated subset")
    p.add_argument("--rounds", type=_positive(int), default=3, help="interleaved rounds per set-up and phase")
    p.add_argument("--seconds", type=_positive(float), default=5.0, help="load per set-up and round")
    p.add_argument("--phases", default="proxy,direct,without-ray,handles",
                   help="which to run: proxy, direct (plain Serve through its proxy, with direct ingress), without-ray "
                   "(the interpreters' servers in a plain process against uvicorn), handles (Serve's replica "
                   "settings for handle calls), batching (the embedder on http_port without and with "
                   "max_batch_size 8)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.set_defaults(handler=_bench("dataplane"))

    p = bench.add_parser(
        "stream", help="a streaming model: time to the first item vs the whole answer, tenfold vs plain Serve",
        description="Serve examples.text_generator as tenfold (1 replica x 2 interpreters, through Serve's proxy "
        "and through http_port) and as 2 plain Serve replicas streaming the same generator; send streamed requests "
        "in interleaved rounds; print the time to the first item and to the whole answer; write stream.json and "
        "stream.png.",
    )
    p.add_argument("--model", default="text_generator", help="a streaming example (or archive)")
    p.add_argument("--tokens", type=_positive(int), default=256, help="tokens per request")
    p.add_argument("--requests", type=_positive(int), default=20, help="requests per set-up and round")
    p.add_argument("--rounds", type=_positive(int), default=3, help="interleaved rounds")
    p.add_argument("--concurrency", type=_positive(int), default=2, help="clients, one open request each")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.set_defaults(handler=_bench("stream"))

    p = bench.add_parser(
        "update", help="a new model version: served in place (user_config) vs a replica restart (args)",
        description="Serve examples.minilm_embedder twice (1 replica x 2 interpreters each) on a local Ray; in "
        "interleaved rounds, update one in place (a deploy that changes only its user_config) and the other by a "
        "restart (a deploy that changes its args), with requests sent all along; print the time from the deploy to "
        "the new version's first answer and the failed requests; write update.json and update.png.",
    )
    p.add_argument("--model", default="minilm_embedder", help="an example to update between two versions")
    p.add_argument("--rounds", type=_positive(int), default=3, help="interleaved rounds (updates of each kind)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.set_defaults(handler=_bench("update"))

    p = bench.add_parser(
        "models", help="several models per replica: memory against one application each, and a model's first request",
        description="Serve 4 example archives on a local Ray: one tenfold application of all 4 against 4 tenfold "
        "applications and against plain Serve (one deployment of the 4 models, and 4 applications), one at a time, "
        "measuring their replicas' PSS with every model loaded; then the latency of a request to a model not yet "
        "loaded against one to a model loaded (max_models_per_replica 1), tenfold on Serve's route and http_port "
        "against plain Serve's @serve.multiplexed, in interleaved rounds. Write models.json and models.png.",
    )
    p.add_argument("--models", default=",".join(("minilm_embedder", "semantic_search", "resnet", "text_encoder")),
                   help="comma-separated examples (or archive paths) to serve together")
    p.add_argument("--phases", default="memory,first", help="comma-separated: memory, first")
    p.add_argument("--rounds", type=_positive(int), default=3, help="interleaved rounds of first requests")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.set_defaults(handler=_bench("models"))

    p = bench.add_parser(
        "soak",
        help="100,000 requests (JSON and Arrow) to one replica: errors, p50/p99 and RSS over time",
        description="Deploys MODEL (an archive, or an example name) as one replica with --interpreters "
        "interpreters on a local Ray, sends --requests requests from --concurrency loopback clients and reports "
        "errors, latency per window and the replica's RSS every --sample-every requests (table, soak.json, "
        "soak.png). Exits 1 if any request failed or RSS grew by 1 KiB or more per request after the warm-up.",
    )
    p.add_argument("model", nargs="?", default="rnn_tagger", help="archive path or an example name")
    p.add_argument("--requests", type=_positive(int), default=100_000)
    p.add_argument("--concurrency", type=_positive(int), default=4, help="clients, one request outstanding each")
    p.add_argument("--sample-every", type=_positive(int), default=10_000, help="requests per latency/RSS sample")
    p.add_argument("--warmup", type=_positive(int), default=None,
                   help="requests before the RSS baseline (default: one sample)")
    p.add_argument("--interpreters", type=_interpreters, default=2)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.set_defaults(handler=_bench("soak"))
    return parser


# -- package and inspect --------------------------------------------------------------------------


def _import_target(target: str) -> tuple[Any, Any]:
    """(module, attribute) of MODULE:ATTR; MODULE may live in the current directory, as with `python -m`."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected MODULE:FACTORY, e.g. examples.resnet:build; got {target!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    try:
        return module, getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name} has no attribute {attr!r}") from None


#: What `--example-input` takes, for messages.
_EXAMPLE_INPUT_FORMS = ("a tensor as SHAPE:DTYPE (e.g. 1x3x32x32:float32) or a JSON value (e.g. '\"a text\"' "
                        "or '[\"pos\", \"neg\"]', quoted for the shell)")


def parse_example_input(text: str, seed: int) -> Any:
    """'1x3x32x32:float32' -> a tensor of that shape and dtype (seeded); any other text is a JSON value:
    '"a text"' -> 'a text', '["pos", "neg"]' -> ['pos', 'neg'].

    The two never overlap: a spec (sizes joined by x, a colon, a dtype) is not JSON, and no JSON value
    has that form (a quoted "2x3:int64" is a string)."""
    import torch

    shape_text, colon, dtype_text = text.rpartition(":")
    if not colon or not shape_text or not set(shape_text) <= set("0123456789x"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            fix = (f"a string is JSON in double quotes: --example-input '{json.dumps(text)}'"
                   if text.strip() and "'" not in text and not text.lstrip().startswith(("[", "{", '"'))
                   else f"give {_EXAMPLE_INPUT_FORMS}")
            raise ValueError(f"--example-input {text!r} is neither SHAPE:DTYPE nor JSON ({exc.msg} at character "
                             f"{exc.pos}); {fix}") from None
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
    from tenfold.packaging import PackageError, open_archive

    try:
        manifest = _package_target(args)
    except (PackageError, ValueError, TypeError, ImportError, AttributeError) as exc:
        print(f"tenfold package: {exc}", file=sys.stderr)
        return 1
    if manifest is None:
        return 2
    print(f"wrote {args.output}: {manifest.name} {manifest.signature()}, "
          f"{manifest.tensor_count} tensors, {manifest.weight_bytes / 1e6:.1f} MB")
    optional = open_archive(args.output).optional_externs()
    if optional:
        names = ", ".join(optional)
        flags = " ".join(f"--extern {t}" for t in optional)
        print(f"not required: {names} (imported only by code that did not run on the example inputs, such as "
              f"the factory; served from the environment if there). To require it: {flags}; to leave it out: "
              f"{flags.replace('--extern', '--mock')}")
    return 0


def _package_target(args: argparse.Namespace) -> Any:
    """The manifest of the archive written for `args`, or None after a usage error (printed)."""
    from tqdm import tqdm

    from tenfold.packaging import repackage, save

    inputs = tuple(parse_example_input(t, seed=i) for i, t in enumerate(args.example_input))
    dynamic = _dynamic(args.dynamic)
    if args.from_torch_package:
        if not inputs:
            print("tenfold package: --from-torch-package needs --example-input", file=sys.stderr)
            return None
        with _progress(tqdm, None) as bar:
            return repackage(args.from_torch_package, args.output, resource=args.resource, example_inputs=inputs,
                             name=args.name, dynamic=dynamic, progress=bar.update)
    if not args.target:
        print("tenfold package: give MODULE:FACTORY (or --from-torch-package ARCHIVE)", file=sys.stderr)
        return None
    module, factory = _import_target(args.target)
    if not inputs:
        if not hasattr(module, "example_inputs"):
            print(f"tenfold package: {module.__name__} has no example_inputs(); pass one --example-input per "
                  f"positional argument of the model, {_EXAMPLE_INPUT_FORMS}", file=sys.stderr)
            return None
        inputs = tuple(module.example_inputs())
        dynamic = dynamic if dynamic is not None else getattr(module, "DYNAMIC", None)
    with _progress(tqdm, None) as bar:
        return save(factory, args.output, example_inputs=inputs, name=args.name, intern=args.intern,
                    extern=args.extern, mock=args.mock, dynamic=dynamic, progress=bar.update)


class _progress:
    """A tqdm bar of bytes written and hashed, shown once packaging takes more than half a second."""

    def __init__(self, tqdm: Any, total: int | None) -> None:
        self._bar = tqdm(total=total, unit="B", unit_scale=True, desc="packaging", leave=False, delay=0.5)

    def __enter__(self) -> Any:
        return self._bar

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()


def _inspect(args: argparse.Namespace) -> int:
    from tenfold.packaging import ManifestMissing, PackageError, open_archive

    try:
        archive = open_archive(args.archive)
    except (PackageError, FileNotFoundError) as exc:
        print(f"tenfold inspect: {exc}", file=sys.stderr)
        return 1
    print(f"archive   {archive.label}")
    print(f"sha256    {archive.sha256()} (the file's digest: the one to pin as `sha256:`)")
    print(f"tensors   {len(archive.storages())} storages, {archive.weight_bytes():,} bytes")
    try:
        manifest = archive.manifest
    except ManifestMissing as exc:
        print(f"manifest  none ({exc})")
        print(f"interned  {', '.join(archive.modules()) or '-'}")
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
    print(f"requires  {', '.join(manifest.requirements) or '-'}")
    if manifest.mocked_modules:
        print(f"mocked    {', '.join(manifest.mocked_modules)}")
    if manifest.writes_weights:
        print(f"writes    {', '.join(manifest.writes_weights)} (needs copy_weights=True)")
    try:
        archive.verify()
    except PackageError as exc:
        print(f"content   FAILED: {exc}")
        return 1
    print(f"content   ok (every record matches the manifest's digests, {manifest.content_sha256[:12]}...)")
    print("\nTo roll out a new version at the same path, pin its sha256 in the application's args: serve deploy "
          "and serve run rebuild an application only when its config changes.")
    return 0


# -- serve ----------------------------------------------------------------------------------------


def _archive_for(model: str) -> Path:
    """The archive to serve: `model` itself, or MODULE:FACTORY packaged to build/MODULE.pt when that is missing
    or older than the module's source."""
    if ":" not in model or Path(model).exists():
        return Path(model)
    module, _ = _import_target(model)
    archive = Path("build") / f"{module.__name__.rsplit('.', 1)[-1]}.pt"
    source = getattr(module, "__file__", None)
    if archive.is_file() and (source is None or os.path.getmtime(source) <= archive.stat().st_mtime):
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    print(f"packaging {model} -> {archive}", flush=True)
    code = main(["package", model, "-o", str(archive)])
    if code:
        raise SystemExit(code)
    return archive


def _serve(args: argparse.Namespace) -> int:
    try:
        archives = {archive.stem: archive for archive in map(_archive_for, args.models)}
    except (ValueError, ImportError) as exc:
        print(f"tenfold serve: {exc}", file=sys.stderr)
        return 2
    problem = next((f"no archive at {a}; give an archive path or MODULE:FACTORY" for a in archives.values()
                    if not a.is_file()), None)
    if len(archives) < len(args.models):
        problem = "two MODELs have the same file name; each is served at /NAME, NAME its file name without .pt"
    elif len(archives) > 1 and args.sha256:
        problem = "--sha256 pins one archive; to pin several, serve them from a YAML config with archives"
    if problem:
        print(f"tenfold serve: {problem}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from tenfold.integration import DeployError, app_builder
    from tenfold.integration.catalog import DEFAULT_NAME
    from tenfold.integration.codec import example_request
    from tenfold.packaging import read_manifest

    several = len(archives) > 1
    models = {}  # by the name each is served at ("" for one, served at /)
    for model, archive in archives.items():
        request_file = archive.resolve().with_suffix(".request.json")
        request_file.write_text(json.dumps(example_request(archive)))
        models[model if several else ""] = (request_file, read_manifest(archive).signature())
    name = args.name or (DEFAULT_NAME if several else next(iter(archives)))
    which = {"archives": {m: str(a) for m, a in archives.items()}} if several else \
        {"archive": str(next(iter(archives.values()))), "sha256": args.sha256}
    ray.init(num_cpus=max(os.cpu_count() or 1, args.interpreters * args.replicas), include_dashboard=False)
    # SIGTERM ends the serving loop as Ctrl-C does, so that Serve and Ray are shut down either way.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            if args.http_port is None:
                args.http_port = args.port + 1
            limits = {"num_cpus": args.num_cpus, "request_timeout_s": args.request_timeout_s,
                      "max_ongoing_requests": args.max_ongoing_requests,
                      "max_queued_requests": args.max_queued_requests, "max_request_bytes": args.max_request_bytes}
            app = app_builder({**which, "interpreters": args.interpreters, "num_replicas": args.replicas,
                               "backend": args.backend, "http_port": args.http_port or None,
                               "http_host": args.host, **{k: v for k, v in limits.items() if v is not None}})
        except (DeployError, ValueError) as exc:  # a pydantic ValidationError is a ValueError, naming the field
            print(f"tenfold serve: {exc}", file=sys.stderr)
            return 1
        serve.run(app, name=name, route_prefix="/")
        address = ray.get_runtime_context().gcs_address
        print(_usage(name, args, models, address), flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("\nstopping: draining replicas and shutting Ray down", flush=True)
    finally:
        # A second Ctrl-C (or a repeated signal) must not cut the shutdown short and leave Ray behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _usage(name: str, args: argparse.Namespace, models: dict[str, tuple[Path, str]], address: str) -> str:
    """How to call the application: `models` gives each model's request file and signature, by name ("" for an
    application of one archive, served at /)."""
    url = f"http://{args.host}:{args.port}/"
    port_url = f"http://{args.host}:{args.http_port}/" if args.http_port else None
    # A local Ray authenticates its clients with ~/.ray/auth_token, and a client uses it only when told to.
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
    several = "" not in models
    shape = f"{args.replicas} replica(s) x {args.interpreters} interpreter(s) ({args.backend})"
    text = [f"\ntenfold is serving {name!r}: {shape}."]
    for model, (request_file, signature) in models.items():
        body = request_file.read_text()
        data = f"'{body}'" if len(body) <= 160 and "'" not in body else f"@{request_file}"
        if several:
            text.append(f"\nModel {model!r}, loaded on its first request. Its signature: {signature}")
        else:
            text.append(f"Its signature: {signature}")
        text.append(f"""
Through Serve's HTTP proxy:

  curl -s -X POST {url}{model} -H 'Content-Type: application/json' -d {data}""")
        if port_url:
            text.append(f"""
Straight to the interpreters (http_port {args.http_port}: each interpreter serves HTTP itself, the fastest way in):

  curl -s -X POST {port_url}{model} -H 'Content-Type: application/json' -d {data}""")
    text.append(f"""
What the replica serves, and its figures:

  curl -s {url}-/manifest
  curl -s {url}-/openapi.json
  curl -s {port_url or url}-/stats""")
    model, (request_file, _) = next(iter(models.items()))
    options = f".options(multiplexed_model_id={model!r})" if several else ""
    text.append(f"""
From Python (another process on this machine), with the same inputs as Python values:

  {auth}{sys.executable} - <<'PY'
  import json, ray
  from ray import serve
  ray.init(address={address!r})
  handle = serve.get_app_handle({name!r}){options}
  inputs = json.load(open({str(request_file)!r}))["inputs"]
  print(handle.remote(*inputs).result())
  PY

The request body{" of each model is in its archive's .request.json" if several else f" is also in {request_file}"}.
Ctrl-C stops serving.
""")
    return "\n".join(text)


# -- bench ----------------------------------------------------------------------------------------


def _bench_runtime(args: argparse.Namespace) -> int:
    from tenfold.bench import runtime

    cfg = runtime.BenchConfig.make(sizes=args.sizes, models=args.models, seconds=args.seconds, reps=args.reps,
                                   round_trips=args.round_trips, out=args.out, quick=args.quick)
    results = runtime.run_benchmark(cfg)
    print()
    print(runtime.format_table(results))
    print(f"\nwrote {cfg.out / 'runtime.json'} and {cfg.out / 'runtime.png'}")
    return 0


def _bench(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of `tenfold bench NAME`: `tenfold.bench.NAME.run(args)`."""

    def handler(args: argparse.Namespace) -> int:
        module = importlib.import_module(f"tenfold.bench.{name}")
        return int(module.run(args))

    return handler


if __name__ == "__main__":
    sys.exit(main())
