"""NaViT throughput: mixres packed (varlen attention) vs vit-pytorch's own forward.

vit-pytorch packs images greedily into groups of at most `group_max_seq_len` tokens,
pads the groups to one length and masks attention with an (L x L) boolean mask per
group; mixres runs the same weights on the packed tokens with block-diagonal varlen
attention (no padding, no mask), cut into bins of the same token budget. Both see the
mixed-N workload (benchmarks/README.md) and report tokens per second; `ratio` is each method's
throughput over vit-pytorch's measured in the same run.

    python -m mixres.bench.navit_bench --model tiny-navit --n 32 --threads 1
    python -m mixres.bench.navit_bench --model navit-b16 --n 16 --repeats 2

`navit_rows(...)` returns the rows (dicts) for the throughput benchmark's table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

__all__ = ["navit_rows"]


def _timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def navit_rows(model="tiny-navit", n: int = 32, seed: int = 0, device="cpu",
               dtype: torch.dtype = torch.float32, token_budget: int = 2048, repeats: int = 3,
               min_image_tokens: int = 64, max_image_tokens: int = 1024) -> list[dict]:
    """Time packed NaViT vs vit-pytorch's grouped forward on mixed-N; one dict per method.

    model: a preset name ("tiny-navit", "navit-b16"), a NaViTModel or a vit-pytorch NaViT.
    token_budget: tokens per forward for both (vit-pytorch's group_max_seq_len, mixres's
    max_batch_tokens); it must hold the largest image (max_image_tokens).
    """
    from mixres.encoders.navit import NaViTEncoder
    from mixres.families.navit import unwrap_navit
    from mixres.models.navit import PRESETS, _build
    from mixres.workloads import mixed_images

    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"navit_rows: unknown NaViT preset {model!r}; known: {sorted(PRESETS)}")
        model = _build(model)
    navit = unwrap_navit(model).eval().to(device, dtype)
    images = [img.to(device, dtype) for img in
              mixed_images(n, seed=seed, patch_size=navit.patch_size, min_image_tokens=min_image_tokens,
                           max_image_tokens=max_image_tokens)]
    tokens = sum(img.shape[1] * img.shape[2] for img in images) // navit.patch_size ** 2
    enc = NaViTEncoder(navit, max_batch_tokens=token_budget)
    methods = {
        "navit packed (mixres varlen)": lambda: enc.encode(images),
        "navit grouped+mask (vit-pytorch)": lambda: navit(images, group_images=True,
                                                          group_max_seq_len=token_budget),
    }
    rows = []
    with torch.inference_mode():
        for method, fn in methods.items():
            seconds = _timed(fn, device, repeats)
            rows.append({"model": name, "method": method, "images": n, "tokens": tokens,
                         "token_budget": token_budget, "device": str(device),
                         "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
                         "tokens_per_s": tokens / seconds})
    ref = rows[-1]["tokens_per_s"]
    for row in rows:
        row["ratio_vs_vit_pytorch"] = row["tokens_per_s"] / ref
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-navit")
    p.add_argument("--n", type=int, default=32, help="images in the mixed-N workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--token-budget", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives stable numbers on an oversubscribed machine)")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = navit_rows(args.model, args.n, args.seed, args.device, getattr(torch, args.dtype),
                      args.token_budget, args.repeats)
    print(f"{rows[0]['model']}, mixed-{args.n} ({rows[0]['tokens']} tokens), {args.device} "
          f"{args.dtype}, {torch.get_num_threads()} threads, budget {args.token_budget} tokens/forward")
    print("| method | seconds | tokens/s | ratio vs vit-pytorch |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['ratio_vs_vit_pytorch']:.2f} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
