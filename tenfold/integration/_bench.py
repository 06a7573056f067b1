"""`tenfold bench serve`: interpreters vs processes vs threads behind Ray Serve, at the same CPU budget."""

from __future__ import annotations

import argparse


def add_commands(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("serve", help="HTTP throughput, latency and memory: 1x2 interpreters vs 2x1 processes")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
