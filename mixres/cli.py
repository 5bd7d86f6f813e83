"""`mixres` command line: embed | verify | serve | bench | train | generate | presets.

Each subcommand lives in the module that does the work and exposes
`add_arguments(parser)` and `run(args) -> int`; this file only routes, and imports a
subcommand's module only when that subcommand runs (so `mixres embed` never pays for
the VLM or the benchmarks).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "embed": ("mixres.embed.cli", "encode a folder / list of images to feature shards on disk"),
    "verify": ("mixres.embed.verify", "check an embed output folder (index, shards, pooled, metadata)"),
    "bench": ("mixres.bench.cli", "benchmarks: throughput | invariance | words | vlm | ..."),
    "serve": ("mixres.serve.cli", "an HTTP embedding server (OpenAI /v1/embeddings) that packs concurrent "
                                  "requests"),
    "presets": ("mixres.presets_cli", "list the model presets (random-init configs for demos and tests)"),
    "train": ("mixres.vlm.training.cli", "train a VLM on mixed-resolution images"),
    "generate": ("mixres.vlm.training.inference", "generate text with a trained VLM run"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixres", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def subcommand_parser(name: str):
    """(module, its argparse parser) of subcommand `name`; nothing runs."""
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mixres {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = _top_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(SUBCOMMANDS)}")
    name, rest = argv[0], argv[1:]
    from mixres.allocator import keep_freed_memory

    keep_freed_memory()  # CPU forwards without page faults on every activation (mixres/allocator.py)
    module, parser = subcommand_parser(name)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("mixres: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # one clear line for the user; MIXRES_DEBUG=1 shows the traceback
        import os
        if os.environ.get("MIXRES_DEBUG"):
            raise
        print(f"mixres {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
