"""`mixres bench <name> ...`: route to one benchmark module, imported only when it runs.

Each benchmark module exposes `add_arguments(parser)` and `run(args) -> int`, like the
`mixres` subcommands, and also runs as `python -m benchmarks.<name>`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "throughput": "benchmarks.throughput",
    "invariance": "benchmarks.invariance",
    "words": "benchmarks.words",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments (see --help after the name)")


def run(args) -> int:
    module = importlib.import_module(BENCHMARKS[args.benchmark])
    parser = argparse.ArgumentParser(prog=f"mixres bench {args.benchmark}",
                                     description=(module.__doc__ or "").splitlines()[0])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.args)) or 0)
