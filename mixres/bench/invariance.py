"""Padding-invariance benchmark: how far is each image's output in a mixed batch from the
unmodified model on that image alone?

For every family x method it encodes a mixed workload (mixed-N plus photos) and compares
each image with the per-image reference (the "loop" backend; NaViT: vit-pytorch's own
forward on that image alone). Methods:

    packed   mixres patch-n-pack, block-diagonal varlen attention
    masked   HF ViT patched with masks + per-image position encodings
    grouped  exact-shape groups, batched
    navit    NaViT run packed
    naive    pad every image to the largest one with zeros and run the model without
             masks (what most pipelines do); each image's content tokens are read back

Batch-composition independence: every image is also encoded in several random batches
and its worst deviation is kept. Writes results.json, results.md and invariance.png
(log-scale heat map of max relative error, method x family) into --out.

    python -m mixres.bench.invariance --quick --out out/invariance
    mixres bench invariance --quick --out out/invariance
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mixres.bench.report import command_line, env_info, write_json

# family -> how to build it (a preset, or a config for families without one)
FAMILIES = {
    "ViT": "tiny-vit",
    "CLIP": "tiny-clip",
    "SigLIP": "tiny-siglip",
    "SigLIP2": "tiny-siglip2",
    "DINOv2": "tiny-dinov2",
    "DINOv2-reg": "tiny-dinov2-reg",
    "NaViT": "tiny-navit",
    "ConvNeXt (CNN)": "tiny-convnext",
    # timm (random init, pretrained=False): packed through mixres/families/timm_*.py
    "timm ViT-reg": "tiny-timm-vit-reg",
    "timm EVA-02": "tiny-timm-eva02",
    "timm NaFlexViT": "tiny-timm-naflexvit",
    "timm ConvNeXt": "tiny-timm-convnext",
}
FULL_FAMILIES = {"ViT": "vit-b16", "CLIP": "clip-b16", "SigLIP": "siglip-b16",
                 "SigLIP2": "siglip2-b16", "DINOv2": "dinov2-s14", "NaViT": "navit-b16"}
METHODS = ["packed", "masked", "grouped", "navit", "naive"]


# models that have no preset of their own

def _seeded(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build().eval()


def _tiny_dinov2_reg():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    cfg = Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, patch_size=14, image_size=56,
                                    num_register_tokens=4)
    return _seeded(lambda: Dinov2WithRegistersModel(cfg))


def _tiny_convnext():
    from transformers import ConvNextConfig, ConvNextModel
    cfg = ConvNextConfig(num_channels=3, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
    return _seeded(lambda: ConvNextModel(cfg))


def _timm(name, **kw):
    import timm
    return lambda: _seeded(lambda: timm.create_model(name, pretrained=False, num_classes=0, **kw))


_TIMM_TINY = dict(depth=2, embed_dim=64, num_heads=2)
EXTRA_BUILDERS = {
    "tiny-dinov2-reg": _tiny_dinov2_reg, "tiny-convnext": _tiny_convnext,
    "tiny-timm-vit-reg": _timm("vit_small_patch16_224", img_size=64, reg_tokens=4, dynamic_img_size=True,
                               **_TIMM_TINY),
    "tiny-timm-eva02": _timm("eva02_tiny_patch14_224", img_size=56, dynamic_img_size=True, **_TIMM_TINY),
    "tiny-timm-naflexvit": _timm("naflexvit_base_patch16_gap", pos_embed_grid_size=(4, 4), **_TIMM_TINY),
    "tiny-timm-convnext": _timm("test_convnext"),
}


def build_model(spec: str):
    if spec in EXTRA_BUILDERS:
        return EXTRA_BUILDERS[spec]()
    if spec.startswith(("timm:", "open_clip:")):
        from mixres.loading import load_model
        return load_model(spec, model_kwargs={"pretrained": False} if spec.startswith("timm:") else None)
    from mixres.loading import load_model
    return load_model(spec)


# workload

def workload(enc, n: int, seed: int, max_side_tokens: tuple[int, int], photos: bool):
    """mixed-N at the model's patch size plus a few real photographs, as CHW tensors."""
    from mixres.workloads import mixed_images

    p = enc.patch_size or 16
    lo, hi = max_side_tokens
    images = mixed_images(n, seed=seed, patch_size=p, min_image_tokens=lo, max_image_tokens=hi)
    names = [f"mixed-{i}" for i in range(n)]
    if photos:
        for name, img in _photos():
            enc_images = enc.prepare([img])
            images.append(enc_images[0])
            names.append(name)
    return images, names


def _photos():
    """scikit-image's bundled sample photographs (small, varied sizes), if installed."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return []
    out = []
    for name in ("astronaut", "coffee", "chelsea", "camera", "rocket"):
        try:
            arr = getattr(data, name)()
        except Exception:  # a sample that needs a download is skipped
            continue
        img = Image.fromarray(arr)
        w, h = img.size
        out.append((f"photo-{name}", img.resize((max(1, w // 4), max(1, h // 5)))))
    return out


# naive padding

def naive_padding(model, images, ref_enc, ref):
    """Pad all images to the largest with zeros, run the model without masks, read back
    each image's content tokens (prefix + the top-left block of the padded grid that has
    the size of the image's own grid in `ref`) and pooled output.

    Without masks the images of a padded batch do not interact, so running each padded
    image alone through the unmodified model is exactly the padded batch, and needs no
    per-family batching code."""
    from mixres.packing import PackedFeatures, seqlens_to_cu

    H = max(i.shape[1] for i in images)
    W = max(i.shape[2] for i in images)
    padded = []
    for img in images:
        canvas = img.new_zeros(img.shape[0], H, W)
        canvas[:, :img.shape[1], :img.shape[2]] = img
        padded.append(canvas)
    out = ref_enc.encode(padded)
    tokens, lens, grids = [], [], []
    for t, g, (h, w) in zip(out.unpack(), out.grid_hw.tolist(), ref.grid_hw.tolist()):
        gh, gw = g
        pre = t[:out.num_prefix]
        grid = t[out.num_prefix:].reshape(gh, gw, -1)[:h, :w].reshape(h * w, -1)
        tokens.append(torch.cat([pre, grid]))
        lens.append(tokens[-1].shape[0])
        grids.append((h, w))
    return PackedFeatures(torch.cat(tokens), seqlens_to_cu(lens), torch.tensor(grids),
                          out.num_prefix, out.pooled)


# one cell of the table

def reference_encoder(model, device, dtype):
    """The unmodified model on one image at a time: the loop backend for HF ViT-family
    models; a CNN through the grouped backend and NaViT through the navit backend, called
    with one image at a time (which is the model on that image alone); timm models (no HF
    config) through the grouped backend one image at a time: timm's forward_features and
    forward_head on that image alone."""
    from mixres import vision_utils
    from mixres.encoders import load_encoder

    if getattr(vision_utils.vision_tower(model), "config", None) is None:
        backend = "grouped"
    elif vision_utils.family(model) == "navit":
        backend = "navit"
    elif vision_utils.patch_size(model) is None:
        backend = "grouped"
    else:
        backend = "loop"
    enc = load_encoder(model, backend=backend, device=device, dtype=dtype)
    enc.prepack = False  # the model's own kernels, as the loop backend runs it (mixres/prepacked.py)
    return enc


def reference(ref_enc, images):
    from mixres.packing import PackedFeatures

    if ref_enc.backend == "loop":
        return ref_enc.encode(images)
    return PackedFeatures.cat([ref_enc.encode([img]) for img in images])


def run_cell(model, method, images, ref, ref_enc, compositions, seed, device, dtype, ref32=None):
    """Worst deviation per image over `compositions` batches, vs `ref` (the model alone in this
    dtype) and, given `ref32` (the fp32 model alone), vs that too: (devs, devs32 | None, batches)."""
    from mixres.encoders import load_encoder
    from mixres.invariance import compare_features

    with torch.inference_mode():
        if method == "naive":
            if ref_enc.backend == "navit":
                raise TypeError("NaViT takes a list of images; there is no padded batch to compare")
            out = naive_padding(model, images, ref_enc, ref)
            return (compare_features(out, ref), None if ref32 is None else compare_features(out, ref32), 1)
        enc = load_encoder(model, backend=method, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(seed)
        batches = [list(range(len(images)))]
        for _ in range(compositions - 1):
            k = int(torch.randint(1, len(images) + 1, (), generator=g))
            batches.append(torch.randperm(len(images), generator=g)[:k].tolist())
        worst = [None] * len(images)
        worst32 = [None] * len(images)
        for idx in batches:
            out = enc.encode([images[i] for i in idx])
            pairs = [(worst, ref)] + ([(worst32, ref32)] if ref32 is not None else [])
            for into, against in pairs:
                for j, d in zip(idx, compare_features(out, against.select(idx))):
                    if into[j] is None or d.worst >= into[j].worst:
                        into[j] = d
        return ([w for w in worst if w is not None],
                None if ref32 is None else [w for w in worst32 if w is not None], len(batches))


def own_error_cell(devs32, own) -> dict:
    """Against the fp32 model alone, per image: this method's error, the model's own error in
    the low precision (alone vs alone), and their ratio (1.0: packing adds nothing)."""
    ratios = [d.worst / max(o.worst, 1e-12) for d, o in zip(devs32, own)]
    return {"vs_fp32_max_rel": max(d.worst for d in devs32),
            "own_max_rel": max(o.worst for o in own), "ratio_max": max(ratios),
            "ratio_median": sorted(ratios)[len(ratios) // 2]}


def summarize(devs):
    tok = [d.token_max for d in devs]
    pooled = [d.pooled_max for d in devs if d.pooled_max is not None]
    cos = [d.pooled_cosine for d in devs if d.pooled_cosine is not None]
    return {
        "images": len(devs),
        "token_max_rel": max(tok),
        "token_mean_rel": sum(d.token_mean for d in devs) / len(devs),
        "pooled_max_rel": max(pooled) if pooled else None,
        "pooled_min_cosine": min(cos) if cos else None,
        "max_rel": max(d.worst for d in devs),
    }


# output

def write_markdown(results, path: Path):
    fams = list(results["families"])
    low = results["dtype"] != "float32"
    lines = ["| method | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for m in results["methods"]:
        row = []
        for f in fams:
            cell = results["cells"].get(f, {}).get(m)
            if cell is None or "error" in cell:
                row.append("n/a")
            else:
                cos = cell["pooled_min_cosine"]
                row.append(f"{cell['max_rel']:.1e}" + (f" (cos {cos:.4f})" if cos is not None else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Cells: max relative error over all images and batch compositions (tokens and pooled), "
                 f"against the model on each image alone in {results['dtype']}, and the lowest cosine "
                 "similarity of pooled outputs. n/a: method does not apply.")
    if low:
        lines += ["", f"Against the fp32 model alone: the model's own {results['dtype']} error (its "
                  f"{results['dtype']} forward alone vs its fp32 forward alone, same image) beside each "
                  "method's, and the worst per-image ratio of the two (goal <= 1.5).", "",
                  "| family | own error | " + " | ".join(f"{m} (ratio)" for m in results["methods"]) + " |",
                  "|---|---|" + "---|" * len(results["methods"])]
        for f in fams:
            cells = results["cells"].get(f, {})
            own = next((c["own_max_rel"] for c in cells.values() if "own_max_rel" in c), None)
            if own is None:
                continue
            row = [f"{c['vs_fp32_max_rel']:.1e} ({c['ratio_max']:.2f}x)" if c and "ratio_max" in c else "n/a"
                   for c in (cells.get(m) for m in results["methods"])]
            lines.append(f"| {f} | {own:.1e} | " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot_heatmap(results, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    fams, methods = list(results["families"]), results["methods"]
    z = np.full((len(methods), len(fams)), np.nan)
    for j, f in enumerate(fams):
        for i, m in enumerate(methods):
            cell = results["cells"].get(f, {}).get(m)
            if cell and "max_rel" in cell:
                z[i, j] = max(cell["max_rel"], 1e-9)
    fig, ax = plt.subplots(figsize=(1.3 * len(fams) + 2.5, 0.7 * len(methods) + 1.8))
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(z), cmap=cmap, norm=LogNorm(vmin=1e-8, vmax=1.0), aspect="auto")
    ax.set_xticks(range(len(fams)), fams, rotation=30, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    for i in range(len(methods)):
        for j in range(len(fams)):
            raw = results["cells"].get(fams[j], {}).get(methods[i], {}).get("max_rel")
            text = "n/a" if np.isnan(z[i, j]) else "0 (bitwise)" if raw == 0 else f"{z[i, j]:.0e}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="max relative error vs. image alone (log)")
    ax.set_title(f"Padding invariance ({results['dtype']}, {results['device']}): "
                 "green = float precision, red = features changed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# entry points

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/invariance", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny presets, few images (CPU, < 2 min)")
    p.add_argument("-n", type=int, default=None, help="images of the mixed-N workload")
    p.add_argument("--families", nargs="*", default=None, help=f"subset of {list(FAMILIES)}")
    p.add_argument("--methods", nargs="*", default=None, help=f"subset of {METHODS}")
    p.add_argument("--compositions", type=int, default=3, help="random batch compositions per image")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="use the base-size presets where they exist")


def run(args) -> int:
    from mixres.invariance import compare_features

    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    n = args.n or (6 if args.quick else 16)
    tokens = (16, 96) if args.quick else (64, 1024)
    families = {k: v for k, v in FAMILIES.items() if not args.families or k in args.families}
    if args.full:
        families = {k: FULL_FAMILIES.get(k, v) for k, v in families.items()}
    methods = args.methods or METHODS
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"command": command_line(), **env_info(args.device), "dtype": dtype_name,
               "device": args.device, "n": n, "tokens": tokens, "families": families,
               "methods": methods, "cells": {}}
    t0 = time.perf_counter()
    for fam, spec in families.items():
        model = build_model(spec).to(args.device)
        ref32, own = None, None
        if dtype != torch.float32:  # the fp32 model alone: what the model's own rounding is held to
            enc32 = reference_encoder(model, args.device, torch.float32)
            with torch.inference_mode():
                images32, _ = workload(enc32, n, args.seed, tokens, photos=True)
                ref32 = reference(enc32, [i.to(args.device) for i in images32])
        model = model.to(dtype)
        ref_enc = reference_encoder(model, args.device, dtype)
        with torch.inference_mode():
            images, names = workload(ref_enc, n, args.seed, tokens, photos=True)
            images = [i.to(args.device, dtype) for i in images]
            ref = reference(ref_enc, images)
            if ref32 is not None:
                own = compare_features(ref, ref32)
        results["cells"][fam] = {}
        for method in methods:
            try:
                devs, devs32, comps = run_cell(model, method, images, ref, ref_enc, args.compositions,
                                               args.seed, args.device, dtype, ref32)
                cell = {**summarize(devs), "compositions": comps}
                if devs32 is not None:
                    cell.update(own_error_cell(devs32, own))
            except (ValueError, TypeError, NotImplementedError) as e:
                cell = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            results["cells"][fam][method] = cell
            shown = f"{cell['max_rel']:.2e}" if "max_rel" in cell else "n/a (" + cell["error"][:60] + ")"
            if "ratio_max" in cell:
                shown += (f"; vs fp32 alone {cell['vs_fp32_max_rel']:.2e}, own {cell['own_max_rel']:.2e}, "
                          f"ratio {cell['ratio_max']:.2f}")
            print(f"{fam:>15} {method:>8}: {shown}", flush=True)
    results["seconds"] = time.perf_counter() - t0
    write_json(results, out_dir / "results.json")
    write_markdown(results, out_dir / "results.md")
    plot_heatmap(results, out_dir / "invariance.png")
    print((out_dir / "results.md").read_text())
    print(f"wrote {out_dir}/results.json, results.md, invariance.png in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
