"""`mixres bench <name> ...`: route to one benchmark module, imported only when it runs.

Each benchmark module exposes `add_arguments(parser)` and `run(args) -> int`, like the
`mixres` subcommands (or one `main(argv)`), and also runs as `python -m mixres.bench.<module>`.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "throughput": "mixres.bench.throughput",
    "invariance": "mixres.bench.invariance",
    "words": "mixres.bench.words",
    "masked": "mixres.bench.masked_throughput",
    "navit": "mixres.bench.navit_bench",
    "vlm": "mixres.bench.vlm_throughput",
    "train-synthetic": "mixres.bench.train_synthetic",
    "embed": "mixres.bench.embed",
    "gpu": "mixres.bench.gpu",
    "search": "mixres.bench.search",
    "serve": "mixres.bench.serve",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments (see --help after the name)")


def benchmark_parser(name: str):
    """(module, its argparse parser, or None for a benchmark that parses in its own main)."""
    module = importlib.import_module(BENCHMARKS[name])
    if not hasattr(module, "add_arguments"):
        return module, None
    parser = argparse.ArgumentParser(prog=f"mixres bench {name}",
                                     description=(module.__doc__ or "").splitlines()[0])
    module.add_arguments(parser)
    return module, parser


def run(args) -> int:
    module, parser = benchmark_parser(args.benchmark)
    if parser is None:  # a benchmark with its own main(argv)
        return int(module.main(args.args) or 0)
    return int(module.run(parser.parse_args(args.args)) or 0)
