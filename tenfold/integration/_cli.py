"""`tenfold serve` (package an example or take an archive, serve it over HTTP and handles) and `tenfold bench serve`."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

EXAMPLES = ("rnn_tagger", "resnet", "text_encoder")


def add_commands(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help="serve a model with Ray Serve (several interpreters per replica) until Ctrl-C",
        description="Serve MODEL: an archive, or the name of an example (packaged to build/NAME.pt if missing). "
        "Starts a local Ray, prints how to call the model with curl and with a Python handle, and serves until "
        "Ctrl-C. For YAML configs use `serve run configs/NAME.yaml`.",
    )
    p.add_argument("model", nargs="?", default="rnn_tagger", help=f"archive path or one of {', '.join(EXAMPLES)}")
    p.add_argument("--interpreters", type=int, default=2, help="interpreters per replica (default: 2)")
    p.add_argument("--replicas", type=int, default=1, help="replicas (default: 1)")
    p.add_argument("--backend", choices=("namespaces", "threads"), default="namespaces")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--sha256", help="refuse the archive unless its sha256 is this")
    p.set_defaults(handler=_serve)

    from . import _bench, soak

    _bench.add_commands(bench)
    soak.add_command(bench)


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "examples" / "__init__.py").is_file() else None


def _archive_for(model: str) -> tuple[Path, str | None]:
    """(archive path, example name or None); packages an example the first time it is asked for."""
    if model not in EXAMPLES:
        return Path(model), None
    root = _repo_root() or Path.cwd()
    archive = root / "build" / f"{model}.pt"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # where `examples` lives
    if not archive.exists():
        from tenfold.cli import main as tenfold_main

        archive.parent.mkdir(parents=True, exist_ok=True)
        print(f"packaging examples.{model} -> {archive}", flush=True)
        code = tenfold_main(["package", f"examples.{model}:build", "-o", str(archive)])
        if code:
            raise SystemExit(code)
    return archive, model


def _example_request(archive: Path, example: str | None) -> tuple[dict[str, Any], list[str]]:
    """A valid request body for the model (the example's own inputs, else zeros), and the input dtypes."""
    from tenfold.packaging import read_manifest

    manifest = read_manifest(archive)
    dtypes = [s.dtype for s in manifest.inputs]
    if example is not None:
        import importlib

        inputs = importlib.import_module(f"examples.{example}").example_inputs()
        inputs = inputs if isinstance(inputs, tuple | list) else (inputs,)
        return {"inputs": [t[:1].tolist() for t in inputs]}, dtypes
    import numpy as np

    arrays = [np.zeros([1 if d is None else d for d in s.shape], dtype=s.dtype) for s in manifest.inputs]
    return {"inputs": [a.tolist() for a in arrays]}, dtypes


def _serve(args: argparse.Namespace) -> int:
    archive, example = _archive_for(args.model)
    if not archive.is_file():
        print(f"tenfold serve: no archive at {archive}; give a path or one of {', '.join(EXAMPLES)}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from .builder import DeployError, app_builder

    request, dtypes = _example_request(archive, example)
    request_file = archive.with_suffix(".request.json")
    request_file.write_text(json.dumps(request))
    name = example or archive.stem
    ray.init(num_cpus=max(os.cpu_count() or 1, args.interpreters * args.replicas), include_dashboard=False)
    # SIGTERM ends the serving loop as Ctrl-C does, so that Serve and Ray are shut down either way.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            app = app_builder({"archive": str(archive), "sha256": args.sha256, "name": name,
                               "interpreters": args.interpreters, "num_replicas": args.replicas,
                               "backend": args.backend})
        except DeployError as exc:
            print(f"tenfold serve: {exc}", file=sys.stderr)
            return 1
        serve.run(app, name=name, route_prefix="/")
        _print_usage(name, args, request_file, dtypes)
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _print_usage(name: str, args: argparse.Namespace, request_file: Path, dtypes: list[str]) -> None:
    url = f"http://{args.host}:{args.port}/"
    print(f"""
tenfold is serving {name!r}: {args.replicas} replica(s) x {args.interpreters} interpreter(s) ({args.backend}).

  curl -s -X POST {url} -H 'Content-Type: application/json' -d @{request_file}
  curl -s {url}-/manifest

From Python (another process on this machine):

  python - <<'PY'
  import json, ray, torch
  from ray import serve
  ray.init(address="auto")
  handle = serve.get_app_handle({name!r})
  inputs = json.load(open({str(request_file)!r}))["inputs"]
  dtypes = {dtypes!r}
  print(handle.remote(*[torch.tensor(v, dtype=getattr(torch, d)) for v, d in zip(inputs, dtypes)]).result())
  PY

Arrow IPC: POST with Content-Type: application/vnd.apache.arrow.stream (one column per input).
Ctrl-C stops serving.
""", flush=True)
