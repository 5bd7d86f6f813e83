"""Throughput of backend="masked" (pad + masks + per-image position codes) vs a per-image loop.

All encode the same mixed-N workload with the same model; the loop runs the unmodified
model on each image alone (`interpolate_pos_encoding=True`), the reference every mixres
backend must equal. "masked" pads each chunk to its largest grid; "masked-r" cuts the
images into padded batches holding at most r x their real tokens (max_padding=r).
Timings alternate between the methods, repeat, and keep the best run of each, so the
ratios are fair on a shared machine. Prints a markdown row and writes
JSON with the environment when --out is given.

    python -m mixres.bench.masked_throughput --model tiny-vit --n 32 --max-image-tokens 256
"""

from __future__ import annotations

import argparse
import time

import torch

from mixres.bench.report import env_info, write_json
from mixres.encoders import load_encoder
from mixres.packing import PackedImages
from mixres.presets import build
from mixres.workloads import mixed_images


def _loop(model, images):
    with torch.inference_mode():
        return [model(img[None], interpolate_pos_encoding=True).last_hidden_state[0] for img in images]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-vit", help="preset name (a ViT)")
    p.add_argument("--n", type=int, default=32, help="images in the mixed-N workload")
    p.add_argument("--min-image-tokens", type=int, default=64)
    p.add_argument("--max-image-tokens", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="token budget of one masked forward (default: all images at once)")
    p.add_argument("--max-padding", type=float, default=1.25, help="r of the masked-r variant")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write JSON here")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args.model)
    p = model.config.patch_size
    images = mixed_images(args.n, seed=0, patch_size=p, min_image_tokens=args.min_image_tokens,
                          max_image_tokens=args.max_image_tokens)
    packed = PackedImages.from_images(images, p)
    tokens = int(packed.seqlens.sum())
    grid = packed.grid_hw
    padded = len(images) * int(grid[:, 0].max()) * int(grid[:, 1].max())
    encoders = {
        "masked": load_encoder(model, backend="masked", max_batch_tokens=args.max_batch_tokens),
        f"masked-{args.max_padding:g}": load_encoder(model, backend="masked", max_padding=args.max_padding,
                                                     max_batch_tokens=args.max_batch_tokens),
    }
    methods = {"loop": lambda: _loop(model, images)}
    methods.update({name: (lambda e=e: e.encode(packed)) for name, e in encoders.items()})

    for run in methods.values():  # warm-up
        run()
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(args.repeats):  # alternate, keep the best of each
        for name, run in methods.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)

    tps = {k: tokens / v for k, v in best.items()}
    ratios = {k: tps[k] / tps["loop"] for k in tps}
    cols = " | ".join(f"{k} {tps[k]:.0f} tok/s ({ratios[k]:.2f}x)" for k in tps)
    bounds = f"{args.min_image_tokens}-{args.max_image_tokens}"
    print(f"| {args.model} | mixed-{args.n} ({bounds} tok) | {tokens} tok, "
          f"one padded batch holds {padded} ({padded / tokens:.2f}x) | {cols} |")
    if args.out:
        write_json({"args": vars(args), "env": env_info(), "tokens": tokens, "padded_tokens": padded,
                    "seconds": best, "tokens_per_s": tps, "over_loop": ratios}, args.out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
