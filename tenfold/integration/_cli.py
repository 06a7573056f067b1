"""`tenfold serve` (until the Ray Serve integration lands: a runtime scaling demo)."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="demo: run a Python-heavy model in 1 and 2 interpreters")
    p.add_argument("--seconds", type=float, default=3.0)
    p.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from tenfold.runtime import InterpreterPool, _demo

    rows = []
    for backend, size in (("namespaces", 1), ("threads", 2), ("namespaces", 2)):
        with InterpreterPool(size, backend=backend, threads_per_interpreter=1) as pool:
            pool.broadcast(_demo.load_mlp)
            futures = [pool.submit(_demo.run_mlp, args.seconds) for _ in range(size)]
            rows.append((backend, size, sum(f.result() for f in futures) / args.seconds))
    base = rows[0][2]
    print(f"{'backend':<12}{'size':>5}{'inf/s':>12}{'vs 1 interp':>13}")
    for backend, size, rate in rows:
        print(f"{backend:<12}{size:>5}{rate:>12,.0f}{rate / base:>12.2f}x")
    return 0
