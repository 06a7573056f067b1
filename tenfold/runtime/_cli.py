"""`tenfold bench runtime`: the runtime's benchmark (see `tenfold.runtime._bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated integers, like 1,2; got {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 15:
        raise argparse.ArgumentTypeError(
            f"sizes must be between 1 and 15 (glibc allows 15 interpreters per process); got {text!r}"
        )
    return sizes


def _models(text: str) -> list[str]:
    from . import _bench_models

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in _bench_models.MODELS]
    if not names or unknown:
        known = ", ".join(_bench_models.MODELS)
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; known: {known}")
    return names


def _positive(kind: type) -> object:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def add_commands(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "runtime",
        help="interpreters vs threads vs processes vs TorchScript: throughput, memory, start-up, round trip",
        description="Run the same models in N namespace interpreters, N threads of one interpreter, N processes "
        "and TorchScript driven by N threads; measure memory per interpreter, start-up and call round trip; "
        "check the figures of issue 2; write runtime.json and runtime.png.",
    )
    p.add_argument("--sizes", type=_sizes, default=[1, 2], help="worker counts N to measure (default 1,2)")
    p.add_argument("--models", type=_models, default=None,
                   help="comma-separated subset of mlp,rnn,conv (default all; mlp,conv with --quick)")
    p.add_argument("--seconds", type=_positive(float), default=None,
                   help="length of one throughput measurement (default 3; 0.3 with --quick)")
    p.add_argument("--reps", type=_positive(int), default=None,
                   help="repetitions per measurement, median reported (default 3; 1 with --quick)")
    p.add_argument("--round-trips", type=_positive(int), default=None,
                   help="calls timed for the round trip (default 20000; 2000 with --quick)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for runtime.json and runtime.png")
    p.add_argument("--quick", action="store_true", help="a smoke run in well under a minute; figures not for quoting")
    p.set_defaults(handler=_bench_runtime)


def _bench_runtime(args: argparse.Namespace) -> int:
    from . import _bench

    cfg = _bench.BenchConfig.make(
        sizes=args.sizes,
        models=args.models,
        seconds=args.seconds,
        reps=args.reps,
        round_trips=args.round_trips,
        out=args.out,
        quick=args.quick,
    )
    results = _bench.run_benchmark(cfg)
    print()
    print(_bench.format_table(results))
    print(f"\nwrote {cfg.out / 'runtime.json'} and {cfg.out / 'runtime.png'}")
    return 0
