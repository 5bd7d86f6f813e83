"""`mixres train`: a TOML config, the synthetic task, or `--resume` of a run in OUT.

`mixres train --synthetic --strategy S [--lm HF_LM_DIR] --out DIR` trains the shapes task
of mixres.vlm.training.synthetic with a tiny VLM and reports content_accuracy on held-out
images. The reference of every key and flag: docs/train.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixres.vlm.training.config import RunConfig
from mixres.vlm.training.run_dir import DEFAULT_OUT, saved_config
from mixres.vlm.training.synthetic import synthetic_config
from mixres.vlm.training.train import train

__all__ = ["add_arguments", "run"]

TOML_HELP = """CONFIG is a TOML file with [vlm], [data] and [train] tables. Every key and its
default: docs/train.md (the same list is in the docstrings of mixres/vlm/config.py for
[vlm] and mixres/vlm/training/config.py for [data] and [train]).
Examples that run as written: examples/README.md (examples/train_tiny.toml)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = TOML_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", help="training TOML ([vlm], [data], [train] tables); with "
                                                  "--resume it defaults to OUT/config.json")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output folder (metrics, checkpoints, plot; default ./{DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true",
                        help="continue OUT's run from its newest checkpoint, with its settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in a non-empty OUT, deleting the run there")
    parser.add_argument("--synthetic", action="store_true",
                        help="train the synthetic shapes task with a tiny VLM (no config needed)")
    parser.add_argument("--strategy", help="override vlm.strategy (joint_decoder | cross_attention | mot)")
    parser.add_argument("--lm", help="override vlm.lm: a local HF causal-LM directory (or hub id), "
                                     "e.g. with --synthetic")
    parser.add_argument("--blank-images", action="store_true",
                        help="synthetic: images without the shape (the no-vision baseline)")
    parser.add_argument("--steps", type=int, help="override train.steps (on --resume: extend the run)")
    parser.add_argument("--time-limit", type=float, help="override train.time_limit (seconds)")
    parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _spec(args) -> dict:
    """The run's configuration as a dict, the flags applied."""
    if args.synthetic:
        if args.config:
            raise ValueError("--synthetic builds its own configuration; leave CONFIG out")
        spec = synthetic_config(args.strategy or "joint_decoder", args.blank_images, lm=args.lm)
    elif args.config or args.resume:
        # --resume without CONFIG: the run's own settings, as it saved them
        spec = RunConfig.from_any(args.config or saved_config(Path(args.out))).to_dict()
        if args.strategy:
            spec["vlm"]["strategy"] = args.strategy
        if args.lm:
            spec["vlm"]["lm"] = args.lm
    else:
        raise ValueError("give a CONFIG.toml, --synthetic, or --resume with an --out that holds a run")
    if args.steps:
        spec["train"]["steps"] = args.steps
    if args.time_limit:
        spec["train"]["time_limit"] = args.time_limit
    if args.no_progress:
        spec["train"]["progress"] = False
    return spec


def run(args) -> int:
    summary = train(_spec(args), args.out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if not summary.get("already_done"):
        print(json.dumps(summary, indent=2))
    return 0
