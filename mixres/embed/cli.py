"""`mixres embed`: the command line over `mixres.embed.runner.embed`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from mixres.embed.runner import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_SHARD_SIZE, embed
from mixres.packing import POOLERS
from mixres.presets import list_presets

__all__ = ["add_arguments", "run"]


# command line

def add_arguments(p) -> None:
    p.add_argument("input", nargs="?", metavar="INPUT",
                   help="a folder of images (recursive), a text file of paths, a JSONL with a 'path' "
                        "field, webdataset .tar shards (paths, 'shards/{000000..000099}.tar', fsspec "
                        "URLs), parquet files (a file, folder or glob) or a datasets save_to_disk folder")
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(list_presets())}; random weights, 'mixres presets' "
                        "shows their shapes), a local directory, a hub id, timm:<name>, hf-hub:timm/..., "
                        "or open_clip:<arch>[:<pretrained>]")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='create_model kwargs (timm, open_clip), e.g. \'{"pretrained": false}\'')
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (rerun to resume)")
    p.add_argument("--demo", action="store_true",
                   help="embed a small folder of generated photos (written to DIR/demo_images)")
    p.add_argument("--backend", default="packed", help="encoder backend (default: packed)")
    p.add_argument("--select-layer", type=int, default=-1, help="-1: last layer; -2: penultimate")
    p.add_argument("--pool", default=None, choices=sorted(POOLERS),
                   help="pooled vector per image: the model's pooler, CLS token, mean of patches, none "
                        "(default: model for --select-layer -1, else cls where the model has a CLS "
                        "token, else mean)")
    p.add_argument("--min-image-tokens", type=int, default=1, help="smaller images are upscaled to this")
    p.add_argument("--max-image-tokens", type=int, default=1024, help="larger images are downscaled to this")
    # the old spellings (the batch budget is --max-batch-tokens)
    p.add_argument("--min-tokens", type=int, dest="old_min_tokens", help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, dest="old_max_tokens", help=argparse.SUPPRESS)
    p.add_argument("--max-pixels", type=int, default=None,
                   help="reject images with more pixels (default: the decompression-bomb guard)")
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="token budget of one forward (halved on device out-of-memory)")
    p.add_argument("--shard-size", type=int, default=None,
                   help=f"inputs per shard (default {DEFAULT_SHARD_SIZE}; 8 with --demo)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="run the model in this dtype (default: as loaded)")
    p.add_argument("--store-dtype", default="auto", choices=["auto", "float32", "float16"],
                   help="dtype of the tokens on disk (auto: float16 for fp16 models, else float32)")
    p.add_argument("--decode", default="pil", metavar="NAME",
                   help="how images become tensors: pil (default, PIL as the model processors do), "
                        "fast (libjpeg-turbo + antialiased torch resize), cuda (nvJPEG + GPU resize); "
                        "see mixres.decode")
    p.add_argument("--num-workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)),
                   help="DataLoader workers that decode images")
    p.add_argument("--on-error", default="skip", choices=["skip", "fail"],
                   help="bad inputs: record in errors.jsonl and go on, or stop")
    p.add_argument("--limit", type=int, default=None, help="embed only the first N inputs")
    p.add_argument("--image-column", default=None,
                   help="parquet / datasets: the column of image bytes or Image structs "
                        "(default: the only such column)")
    p.add_argument("--id-column", default=None,
                   help="parquet / datasets: the column whose values are the keys "
                        "(default: <file name>#<row>)")
    p.add_argument("--no-tokens", action="store_true",
                   help="write only pooled/ and metadata/ (no token shards)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process (+ DataLoader workers; torchrun for ranks); ray: Ray Data "
                        "decode tasks and encoder actors (pip install 'mixres[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: a cluster to connect to (auto, ray://host:10001, host:6379; "
                        "default: start a local Ray with this machine's CPUs and GPUs)")
    p.add_argument("--ray-actors", type=int, default=None,
                   help="--engine ray: encoder actors, each holding the model (default: one per GPU, else 1)")
    p.add_argument("--ray-cpus-per-decode", type=float, default=1.0,
                   help="--engine ray: CPUs reserved by each decode task (default 1)")
    p.add_argument("--ray-cpus-per-actor", type=int, default=1,
                   help="--engine ray: CPUs reserved by each encoder actor, its torch threads when it "
                        "runs on CPU (default 1)")


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
    import json

    from mixres.loading import load_model

    try:
        kwargs = json.loads(text)
    except ValueError as err:
        raise ValueError(f"--model-kwargs is not valid JSON ({err}): {text!r}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {text!r}")
    return load_model(name, model_kwargs=kwargs)


def run(args) -> int:
    _take_old_flags(args)
    if args.demo:
        if args.input:
            raise ValueError("give either INPUT or --demo, not both")
        args.input = _demo_inputs(args.out)
        # small shards, so decoding and encoding overlap even on 24 photos
        args.shard_size = args.shard_size or 8
    if not args.input:
        raise ValueError("INPUT is required (a folder, a text file of paths or a JSONL), or --demo")
    model, model_name = args.model, None
    if args.model_kwargs:
        model, model_name = _with_kwargs(args.model, args.model_kwargs), f"{args.model} {args.model_kwargs}"
    s = embed(args.input, args.out, model, model_name=model_name, backend=args.backend,
              select_layer=args.select_layer,
              pool=args.pool, min_image_tokens=args.min_image_tokens, max_image_tokens=args.max_image_tokens,
              max_pixels=args.max_pixels, max_batch_tokens=args.max_batch_tokens, device=args.device,
              dtype=args.dtype, store_dtype=args.store_dtype,
              shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
              num_workers=args.num_workers, on_error=args.on_error, limit=args.limit,
              progress=not args.no_progress, image_column=args.image_column, id_column=args.id_column,
              write_tokens=not args.no_tokens, decode=args.decode, engine=args.engine,
              ray_address=args.ray_address, ray_actors=args.ray_actors,
              ray_cpus_per_decode=args.ray_cpus_per_decode, ray_cpus_per_actor=args.ray_cpus_per_actor)
    if "index_rows" in s:  # rank 0
        resumed = f" ({s['done_before']} shards were already done)" if s["done_before"] else ""
        if s["shards"] == 0 and s["errors"] == 0 and s["done_before"]:
            print(f"mixres embed: nothing left to do: all {s['done_before']} shards were already done")
        else:
            print(f"mixres embed: {s['images']} images, {s['tokens']:,} tokens "
                  f"in {s['encode_seconds']:.2f} s "
                  f"({s['images_per_s']:.1f} images/s, {s['tokens_per_s']:,.0f} tokens/s; "
                  f"{s['wall_seconds']:.1f} s in all){resumed}")
        print(f"mixres embed: {s['index_rows']} inputs in {s['out']}/index.jsonl, "
              f"{s['index_errors']} in errors.jsonl")
    return 0
