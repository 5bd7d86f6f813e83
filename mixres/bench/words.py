"""Rendered-words benchmark: the original toolkit's `encode_images` on words-BxL.

words-BxL (mixres.workloads.words_batch): B samples x L images like rendered words,
heights 16-32 px, widths 16-512 px, some slots empty, as a zero-padded (B, L, 3, H, W)
tensor with (B, L, 2) true sizes. For each model it times, in one run:

    sequential  encode_images_sequentially: the unmodified model on one image at a time
                (the reference every exact method must equal)
    auto        encode_images: the family's fastest exact route (packed varlen for
                the family's route: packed where it has a packed recipe, else grouped)
    grouped     encode_images(route="grouped"): exact-shape batches
    packed      encode_images(route="packed"), where the packed backend takes the model
    naive       encode_images_batch on all images zero-padded to one size (one forward;
                not exact: its error column says how far off padding puts the embeddings)

and reports images/s, the speed-up over sequential and the max abs error against it.
Writes results.json and results.md into --out.

    python -m mixres.bench.words --out out/words
    mixres bench words --preset small --out out/words
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mixres.bench.report import command_line, env_info, write_json

# preset -> model specs: mixres presets by name, or local builders (families without one)
PRESETS = {
    "tiny": ["tiny-vit", "tiny-siglip2", "tiny-dinov2", "tiny-navit", "tiny-resnet", "tiny-swinv2"],
    "small": ["small-vit", "small-resnet"],
}
METHODS = ["sequential", "auto", "grouped", "packed", "naive"]


# models that have no mixres preset

def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def _small_vit():  # ViT-S/16 shapes
    import transformers as tf
    return tf.ViTModel(tf.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, patch_size=16, image_size=224))


def _small_resnet():  # ResNet-18 shapes
    import transformers as tf
    return tf.ResNetModel(tf.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                                          depths=[2, 2, 2, 2], layer_type="basic"))


def _tiny_resnet():
    import transformers as tf
    return tf.ResNetModel(tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64],
                                          depths=[1, 1, 1], layer_type="basic"))


def _tiny_swinv2():
    import transformers as tf
    return tf.Swinv2Model(tf.Swinv2Config(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1],
                                          num_heads=[2, 2, 4], window_size=4))


LOCAL = {"small-vit": _small_vit, "small-resnet": _small_resnet, "tiny-resnet": _tiny_resnet,
         "tiny-swinv2": _tiny_swinv2}


def load(spec: str):
    if spec in LOCAL:
        return _seeded(LOCAL[spec])
    if spec.endswith("navit"):
        import mixres.models.navit  # noqa: F401  (registers the NaViT presets)
    from mixres.loading import load_model
    return load_model(spec).eval()


# timing

def bench_model(spec: str, x: torch.Tensor, dims: torch.Tensor, methods, repeats: int) -> dict:
    """Time each method on one model; repeats are interleaved (method A, B, ..., A, B, ...)
    so that a busy machine slows every method alike, and the median is kept."""
    from mixres import batch_image_encoder as bie
    from mixres.families import family

    model = load(spec)
    n = int((dims > 0).all(-1).sum())
    crops = [x[b, s, :, :h, :w] for b in range(x.shape[0]) for s in range(x.shape[1])
             for h, w in [dims[b, s].tolist()]]
    filled = (dims > 0).all(-1, keepdim=True)
    runs = {
        "sequential": lambda: bie.encode_images_sequentially(model, crops).reshape(*dims.shape[:2], -1),
        "auto": lambda: bie.encode_images(model, x, dims),
        "grouped": lambda: bie.encode_images(model, x, dims, route="grouped"),
        "packed": lambda: bie.encode_images(model, x, dims, route="packed"),
        "naive": lambda: bie.encode_images_batch(model, x.flatten(0, 1)).reshape(*filled.shape[:2], -1)
        * filled,
    }
    route = bie.route_for(model)
    row = {"model": spec, "family": family(model), "route": route, "images": n, "methods": {}}
    todo = [m for m in methods if m != "packed" or route == "packed"]
    if "packed" in methods and route != "packed":
        row["methods"]["packed"] = {"skipped": "packed backend not installed or not for this family"}
    times: dict[str, list[float]] = {m: [] for m in todo}
    with torch.inference_mode():
        outs = {m: runs[m]() for m in todo}  # warm-up, and the results to compare
        for _ in range(repeats):
            for m in todo:
                t0 = time.perf_counter()
                runs[m]()
                times[m].append(time.perf_counter() - t0)
    ref = outs.get("sequential")
    for m in todo:
        sec = statistics.median(times[m])
        err = None if ref is None else float((outs[m] - ref).abs().max())
        row["methods"][m] = {"seconds": sec, "images_per_s": n / sec, "max_abs_err": err,
                             "all_seconds": times[m]}
    seq = row["methods"].get("sequential", {}).get("seconds")
    for r in row["methods"].values():
        if seq and "seconds" in r:
            r["speedup_vs_sequential"] = seq / r["seconds"]
    return row


def to_markdown(results: dict) -> str:
    lines = [f"# words-{results['b']}x{results['l']} (CPU, {results['dtype']}, "
             f"{results['torch_threads']} threads)", "",
             f"`{results['command']}`", "",
             "| model | route | method | images/s | vs sequential | max abs err vs sequential |",
             "|---|---|---|---:|---:|---:|"]
    for row in results["rows"]:
        for m, r in row["methods"].items():
            if "skipped" in r:
                lines.append(f"| {row['model']} | {row['route']} | {m} | - | - | {r['skipped']} |")
                continue
            err = "ref" if m == "sequential" else f"{r['max_abs_err']:.1e}"
            lines.append(f"| {row['model']} | {row['route']} | {m} | {r['images_per_s']:.1f} | "
                         f"{r.get('speedup_vs_sequential', float('nan')):.2f}x | {err} |")
    lines += ["", "Every ratio is against `sequential` measured in the same run (median of "
              f"{results['repeats']} interleaved repeats after a warm-up). `auto` is the "
              "family's route (packed varlen for ViT-family, NaViT natively, else grouped)."]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/words", help="output folder")
    p.add_argument("--preset", choices=sorted(PRESETS), action="append", default=None,
                   help="model sets to run (repeatable; default: tiny and small)")
    p.add_argument("--models", nargs="*", default=None,
                   help=f"model specs instead of presets (mixres presets or {sorted(LOCAL)})")
    p.add_argument("--methods", nargs="*", default=METHODS, help=f"subset of {METHODS}")
    p.add_argument("-b", type=int, default=8, help="samples")
    p.add_argument("-l", type=int, default=32, help="images per sample")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def run(args) -> int:
    from mixres.workloads import words_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {METHODS}")
    specs = args.models or [s for name in (args.preset or ["tiny", "small"]) for s in PRESETS[name]]
    x, dims = words_batch(args.b, args.l, seed=args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"command": command_line(), **env_info("cpu"),
               "dtype": "float32", "b": args.b, "l": args.l, "repeats": args.repeats, "rows": []}
    for spec in specs:
        row = bench_model(spec, x, dims, args.methods, args.repeats)
        results["rows"].append(row)
        summary = ", ".join(f"{m} {r['images_per_s']:.1f} img/s" for m, r in row["methods"].items()
                            if "images_per_s" in r)
        print(f"{spec} ({row['route']}): {summary}", flush=True)
    write_json(results, out_dir / "results.json")
    (out_dir / "results.md").write_text(to_markdown(results))
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
