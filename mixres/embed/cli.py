"""`mixres embed`: the command line over `mixres.embed.driver.embed`.

Its flags are the fields of `EmbedConfig` (generated from them, so the help, the library and
the TOML file cannot disagree), plus INPUT, --out, --model, --model-kwargs and --demo.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mixres.embed.config import add_config_arguments, config_from_args
from mixres.embed.driver import embed
from mixres.loading import load_model
from mixres.presets import list_presets

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    p.add_argument("input", nargs="?", metavar="INPUT",
                   help="a folder of images (recursive), a text file of paths, a JSONL with a 'path' "
                        "field, webdataset .tar shards (paths, 'shards/{000000..000099}.tar', fsspec "
                        "URLs, an img2dataset output folder), parquet files (a file, folder or glob) or "
                        "a datasets save_to_disk folder")
    p.add_argument("--model", default=None,
                   help=f"a preset ({', '.join(list_presets())}; random weights, 'mixres presets' "
                        "shows their shapes), a local directory, a hub id, timm:<name>, hf-hub:timm/..., "
                        "or open_clip:<arch>[:<pretrained>] (required)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='create_model kwargs (timm, open_clip), e.g. \'{"pretrained": false}\'')
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (rerun to resume) (required)")
    p.add_argument("--demo", action="store_true",
                   help="embed a small folder of generated photos (written to DIR/demo_images)")
    add_config_arguments(p)
    # the old spellings (the batch budget is --max-batch-tokens)
    p.add_argument("--min-tokens", type=int, dest="old_min_tokens", help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, dest="old_max_tokens", help=argparse.SUPPRESS)


def _demo_inputs(out: str) -> str:
    from mixres.workloads import write_photos

    folder = Path(out) / "demo_images" if out else Path(tempfile.mkdtemp(prefix="mixres-demo-"))
    if not any(folder.glob("photo_*")):
        write_photos(folder, n=24, seed=0)
    return str(folder)


def _take_old_flags(args) -> None:
    for old, new in (("min", "min_image_tokens"), ("max", "max_image_tokens")):
        value = getattr(args, f"old_{old}_tokens", None)
        if value is not None:
            print(f"mixres embed: --{old}-tokens is deprecated; it is now --{new.replace('_', '-')} "
                  "(the per-image token cap; the batch budget is --max-batch-tokens)", file=sys.stderr)
            setattr(args, new, value)


def _with_kwargs(name: str, text: str):
    try:
        kwargs = json.loads(text) if isinstance(text, str) else text
    except ValueError as err:
        raise ValueError(f"--model-kwargs is not valid JSON ({err}): {text!r}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {text!r}")
    return load_model(name, model_kwargs=kwargs)


def run(args) -> int:
    _take_old_flags(args)
    config, extra = config_from_args(args)
    inputs, out = args.input or extra.get("input"), args.out or extra.get("out")
    name, kwargs = args.model or extra.get("model"), args.model_kwargs or extra.get("model_kwargs")
    for flag, value in (("--out", out), ("--model", name)):
        if not value:
            raise ValueError(f"{flag} is required (on the command line or in the --config file)")
    if args.demo:
        if inputs:
            raise ValueError("give either INPUT or --demo, not both")
        inputs = _demo_inputs(out)
        if "shard_size" not in vars(args):  # small shards, so decoding and encoding overlap on 24 photos
            config.shard_size = 8
    if not inputs:
        raise ValueError("INPUT is required (a folder, a text file of paths or a JSONL), or --demo")
    model = name
    if kwargs:
        text = kwargs if isinstance(kwargs, str) else json.dumps(kwargs)
        model, config.model_name = _with_kwargs(name, text), f"{name} {text}"
    s = embed(inputs, out, model, config)
    if "index_rows" in s:  # rank 0
        print(summary_line(s))
        print(f"mixres embed: {s['index_rows']} inputs in {s['out']}/index.jsonl, "
              f"{s['index_errors']} in errors.jsonl")
    return 0


def summary_line(s: dict) -> str:
    """What a run did, its rate over the run's wall time, and the encoders' own rate beside it."""
    if s["shards"] == 0 and s["errors"] == 0 and s["done_before"]:
        return f"mixres embed: nothing left to do: all {s['done_before']} shards were already done"
    resumed = f"; {s['done_before']} shards were already done" if s["done_before"] else ""
    return (f"mixres embed: {s['images']} images, {s['tokens']:,} tokens, {s['errors']} errors in "
            f"{s['seconds']:.1f} s: {s['images_per_s']:.1f} images/s over the run's wall time "
            f"(encoder alone: {s['encoder_images_per_s']:.1f} images/s){resumed}")
