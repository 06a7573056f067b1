"""The `tenfold` command: package, inspect, serve, bench.

Each part of tenfold adds its own subcommands (`add_commands(commands, bench)` in its `_cli` module);
heavy imports (torch, ray) happen inside the handlers, so `tenfold --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

_PARTS = ("tenfold.packaging._cli", "tenfold.integration._cli", "tenfold.runtime._cli")


def _ensure_static_tls() -> None:
    # glibc reads GLIBC_TUNABLES only at process start (pitfall 3): set it and start again.
    from tenfold.runtime import _glibc

    if _glibc.reserved_static_tls() >= _glibc.STATIC_TLS_PER_INTERPRETER * _glibc.MAX_NAMESPACES:
        return
    if os.environ.get("TENFOLD_REEXECED"):
        return  # the platform ignored it (not glibc): the runtime will say what is wrong
    env = dict(os.environ, TENFOLD_REEXECED="1")
    current = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = f"{current}:{_glibc.RECOMMENDED_TUNABLES}" if current else _glibc.RECOMMENDED_TUNABLES
    os.execve(sys.executable, [sys.executable, "-m", "tenfold", *sys.argv[1:]], env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenfold", description="Serve PyTorch models from several Python interpreters per process."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench_parser = commands.add_parser("bench", help="run a benchmark (runtime, serve, soak)")
    bench = bench_parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_commands(commands, bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.platform.startswith("linux") and argv is None:
        _ensure_static_tls()
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
