"""Throughput benchmark: packed vs padded+mask vs shape-grouped vs per-image loop, with the
dense oracle (uniform images of the workload's mean size, same total tokens) as the ceiling.

Workload mixed-N (mixres.workloads): N images, aspect ratio in [0.5, 2], 64-1024 tokens
(`--tokens LO-HI`: that many per image instead), or words-N (`--workload words`): N
word-sized images of 1-64 tokens. The oracle's images have the workload's mean size
(uniform tiny images are the dense limit for tiny ones, uniform large ones for large ones).
Methods, all on the same images and the same model object:

    packed   mixres patch-n-pack (one sequence per chunk, block-diagonal varlen attention)
    padded   every image zero-padded to the largest H and the largest W, one batch, with
             HF's own attention-mask path: ViT/DeiT/DINOv2 take attention_mask (B, L) over
             CLS + real patches; SigLIP2 gets its NaFlex pixel_attention_mask; families
             whose forward takes no mask (CLIP, SigLIP) run padded without one (same cost,
             wrong features: this benchmark measures speed only)
    grouped  images grouped by exact shape, one dense batch per shape (backend "grouped")
    loop     the unmodified model on each image alone
    oracle   dense batch of uniform square images of the workload's mean size with the same
             token count, the model's own forward as a user runs it
    oracle-224  the same with 224x224 images (14x14 patches), whatever the workload's size
    oracle-prepacked  the same dense batch with the CPU linears mixres' encoders use
             (`mixres.prepacked`: oneDNN weights packed once): how much of packed vs oracle
             is the kernels and how much the packing
    hf-naflex  (SigLIP2) HF's own NaFlex forward: each image's patch sequence padded to the
             longest of its batch, pixel_attention_mask (mixres.bench.hf_naflex)
    timm-naflex  (a timm NaFlexVit) timm's own mixed-size path: each image in the smallest of
             its NaFlex sequence-length buckets, padded with a patch_valid mask
             (mixres.bench.timm_naflex)

Warm-up on a few images, then timed repeats in one run (median). Prints tokens/s, images/s,
peak memory (CUDA), ratios vs the oracle and vs packed; writes results.json (machine,
versions, exact command), results.md and throughput.png into --out.

    python -m mixres.bench.throughput --model vit-b16 --dtype float32 --device cpu --quick --out out/tp
    mixres bench throughput --model timm:naflexvit_base_patch16_gap --model-kwargs '{"pretrained": false}'
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mixres.bench.report import command_line, env_info, write_json

METHODS = ["packed", "padded", "masked", "grouped", "loop"]


# models

def _fallback(name: str):
    """A few configs for when mixres.presets is not importable (random init, fixed seed)."""
    import transformers as T

    table = {
        "vit-b16": lambda: T.ViTModel(T.ViTConfig()),
        "tiny-vit": lambda: T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128)),
    }
    if name not in table:
        raise ValueError(f"unknown model {name!r} (mixres.presets is not available; "
                         f"built-in: {sorted(table)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return table[name]()


def load_model(name: str, model_kwargs: dict | None = None):
    try:
        from mixres.loading import load_model as load
    except ImportError:
        return _fallback(name).eval()
    return load(name, model_kwargs=model_kwargs).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# methods: each takes (model, images) and returns nothing; timed from outside

def _backend_runner(name):
    def run_backend(model, images, **_):
        from mixres.encoders import get_backend
        get_backend(name)(model).encode(images)
    run_backend.__name__ = f"run_{name}"
    return run_backend


run_packed, run_masked, run_grouped, run_loop, run_navit = (
    _backend_runner(n) for n in ("packed", "masked", "grouped", "loop", "navit"))


def run_vit_pytorch(model, images, **_):
    """vit-pytorch's own NaViT forward: greedy groups of <= 2048 tokens, each padded to one
    length with an (L x L) boolean attention mask."""
    from mixres.families.navit import unwrap_navit
    unwrap_navit(model)(list(images), group_images=True, group_max_seq_len=2048)


def run_padded(model, images, patch_size, **_):
    from mixres import vision_utils

    tower = vision_utils.vision_tower(model)
    p = patch_size
    H = max(img.shape[1] for img in images)
    W = max(img.shape[2] for img in images)
    batch = images[0].new_zeros(len(images), images[0].shape[0], H, W)
    valid = torch.zeros(len(images), H // p, W // p, dtype=torch.bool, device=batch.device)
    for i, img in enumerate(images):
        batch[i, :, :img.shape[1], :img.shape[2]] = img
        valid[i, :img.shape[1] // p, :img.shape[2] // p] = True
    if getattr(tower, "config", None) is None:  # timm / open_clip: no mask argument
        return _whole(tower, batch)
    kw = vision_utils.forward_kwargs(tower, batch)
    if "pixel_attention_mask" in kw:  # SigLIP2 NaFlex: its own padding mask
        kw["pixel_attention_mask"] = valid.flatten(1).long()
    elif vision_utils.accepts(tower, "attention_mask"):
        prefix = vision_utils.num_prefix_tokens(tower)
        mask = torch.cat([valid.new_ones(len(images), prefix), valid.flatten(1)], 1)
        kw["attention_mask"] = mask.long()
    tower(**kw)


def run_oracle(model, images, **_):
    from mixres import vision_utils

    tower = vision_utils.vision_tower(model)
    if getattr(tower, "config", None) is None:
        return _whole(tower, torch.stack(images))
    tower(**vision_utils.forward_kwargs(tower, torch.stack(images)))


def run_oracle_prepacked(model, images, **kw):
    from mixres.prepacked import prepacked_linears

    with prepacked_linears():
        run_oracle(model, images, **kw)


def _whole(tower, batch):
    """A non-HF model (timm, open_clip) on a dense batch, through its family's whole-model call."""
    from mixres.encoders.grouped import call_for

    call_for(tower).call(tower, batch)


def run_hf_naflex(model, images, **kw):
    from mixres.bench.hf_naflex import run_hf_naflex as run
    run(model, images, **kw)


def run_timm_naflex(model, images, **kw):
    from mixres.bench.timm_naflex import run_timm_naflex as run
    run(model, images, **kw)


RUNNERS = {"packed": run_packed, "padded": run_padded, "masked": run_masked, "grouped": run_grouped,
           "loop": run_loop, "oracle": run_oracle, "oracle-prepacked": run_oracle_prepacked,
           "oracle-224": run_oracle,  # the same forward on 224x224 images (chosen in `run`)
           "navit": run_navit, "vit-pytorch": run_vit_pytorch,
           "timm-naflex": run_timm_naflex, "hf-naflex": run_hf_naflex}
# a NaViT model: mixres' packed NaViT vs vit-pytorch's own grouped forward
NAVIT_METHODS = ["navit", "vit-pytorch"]
# a timm NaFlexVit: mixres packed vs timm's padded sequence buckets on the same weights
NAFLEX_METHODS = ["packed", "timm-naflex", "grouped", "padded", "oracle"]
# default methods by family (others: METHODS + oracle)
FAMILY_METHODS = {"navit": NAVIT_METHODS, "timm_naflex": NAFLEX_METHODS,
                  "siglip2": ["packed", "hf-naflex", "padded", "grouped", "loop", "oracle"]}


def time_methods(names, model, inputs, warm, repeats, device, patch_size):
    """Warm every method up, then time them round-robin, `repeats` rounds: machine noise
    (other processes, clock changes) then hits every method alike. Returns, per method,
    the best and the median time of its rounds and its peak CUDA memory."""
    times = {n: [] for n in names}
    peaks = {}
    with torch.inference_mode():
        for n in names:
            RUNNERS[n](model, warm[n], patch_size=patch_size)  # kernels, caches, allocator
            _sync(device)
        for _ in range(repeats):
            for n in names:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                RUNNERS[n](model, inputs[n], patch_size=patch_size)
                _sync(device)
                times[n].append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peaks[n] = max(peaks.get(n, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    return {n: (min(t), statistics.median(t), t, peaks.get(n)) for n, t in times.items()}


# report

def _ratio(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"  # nan: that reference was not measured


def write_markdown(res: dict, path: Path) -> None:
    side = res.get("oracle_side", 224)
    lines = [f"# Throughput: {res['model']} {res['dtype']} on {res['device_name']}", "",
             f"{res['workload']} workload: {res['tokens']} tokens in {res['n']} images "
             f"({res['distinct_shapes']} distinct shapes); oracle: {res['oracle_images']} images of "
             f"{side}x{side}" + (f" (oracle-224: {res['oracle_224_images']} of 224x224)"
                                 if "oracle-224" in res["methods"] else "") + ".",
             "", "| method | seconds | tokens/s | images/s | peak MiB | vs oracle | vs packed |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["methods"].items():
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['images_per_s']:.2f} | "
                     f"{peak} | {_ratio(r['vs_oracle'])} | {_ratio(r['vs_packed'])} |")
    lines += ["", f"command: `{res['command']}`", ""]
    path.write_text("\n".join(lines))


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in res["methods"] if n != "oracle"]
    vals = [res["methods"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, vals, color=["tab:green" if n in ("packed", "navit") else "tab:gray" for n in names])
    if "oracle" in res["methods"]:
        ax.axhline(res["methods"]["oracle"]["tokens_per_s"], color="tab:red", ls="--",
                   label=f"oracle ({res.get('oracle_side', 224)}x{res.get('oracle_side', 224)} dense)")
        ax.legend()
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{res['model']} {res['dtype']} {res['device_name']}, {res['workload']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# entry points

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit-b16", help="preset name, local path, hub id, timm:<name>, "
                                                       "open_clip:<arch>")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='create_model kwargs for timm: / open_clip: models, e.g. \'{"pretrained": false}\'')
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-n", type=int, default=256, help="images in the workload")
    p.add_argument("--workload", default="mixed", choices=["mixed", "words"],
                   help="mixed-N (aspect 0.5-2, --tokens per image) or words-N (1-64 tokens)")
    p.add_argument("--tokens", default="64-1024", metavar="LO-HI",
                   help="mixed-N: tokens per image, uniform in [LO, HI] (default 64-1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=None,
                   help=f"comma-separated (default: {','.join(METHODS + ['oracle'])}; "
                        f"{','.join(NAVIT_METHODS)} for a NaViT model)")
    p.add_argument("--quick", action="store_true", help="6 images, two rounds (CPU smoke run)")
    p.add_argument("--out", default="out/throughput")


def parse_tokens(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split("-"))
    except ValueError:
        lo = hi = 0
    if not 1 <= lo <= hi:
        raise ValueError(f"--tokens {text!r}: expected LO-HI with 1 <= LO <= HI, e.g. 64-1024")
    return lo, hi


def workload(kind: str, n: int, seed: int, patch_size: int, tokens: str):
    """(images, name): mixed-N at `tokens` per image, or words-N."""
    from mixres.workloads import grid_images, mixed_grids, word_grids

    if kind == "words":
        return grid_images(word_grids(n, seed, patch_size), seed, patch_size), f"words-{n}"
    lo, hi = parse_tokens(tokens)
    name = f"mixed-{n}" + ("" if (lo, hi) == (64, 1024) else f" ({lo}-{hi} tokens)")
    return grid_images(mixed_grids(n, seed, lo, hi), seed, patch_size), name


def run(args) -> int:
    from mixres.workloads import oracle_images

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, repeats = (6, 2) if args.quick else (args.n, args.repeats)
    import json

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
    model = load_model(args.model, kwargs).to(device=device, dtype=dtype)
    from mixres import vision_utils
    family = vision_utils.family(model)
    p = vision_utils.patch_size(model)
    if args.methods is None:
        args.methods = ",".join(FAMILY_METHODS.get(family, METHODS + ["oracle"]))
    images, workload_name = workload(args.workload, n, args.seed, p, args.tokens)
    images = [x.to(device, dtype) for x in images]
    counts = [x.shape[1] * x.shape[2] // p ** 2 for x in images]
    tokens = sum(counts)
    # the dense limit of this workload: uniform square images of its mean size. Attention
    # grows with the square of an image's tokens, so uniform images smaller than the mean
    # (224x224 where the mean image is 730 tokens) do a quarter of the workload's attention
    # per token: that compares workloads, not packing (oracle-224 still runs that one)
    side = max(1, round((tokens / len(images)) ** 0.5))
    sides = {"oracle": side, "oracle-prepacked": side, "oracle-224": 224 // 16}
    made = {s: [x.to(device, dtype) for x in oracle_images(tokens, patch_size=p, side=s * p)]
            for s in set(sides.values())}  # oracle and oracle-prepacked share one batch
    dense = {name: made[s] for name, s in sides.items()}
    oracle = dense["oracle"]
    warm = [min(images, key=lambda x: x.numel())]  # one small image: warms kernels, costs little
    res = {"model": args.model, "model_kwargs": kwargs, "dtype": args.dtype, "device": str(device), "n": n,
           "workload": workload_name, "tokens": tokens, "image_tokens": [min(counts), max(counts)],
           "oracle_side": side * p, "distinct_shapes": len({tuple(x.shape) for x in images}),
           "oracle_images": len(oracle), "oracle_224_images": len(dense["oracle-224"]), "repeats": repeats,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"CPU ({torch.get_num_threads()} threads)",
           "env": env_info(str(device)), "command": command_line(),
           "methods": {}}
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        if name not in RUNNERS:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(RUNNERS)}")
    # a backend that does not apply to this model (masked is ViT-only) is left out, said why
    for name in list(names):
        try:
            if name in ("masked", "grouped", "packed", "loop", "navit"):
                from mixres.encoders import get_backend
                get_backend(name)(model)
            elif name == "hf-naflex" and family != "siglip2":
                raise TypeError(f"HF's NaFlex forward is SigLIP2's, not {family!r}'s")
        except (TypeError, ValueError) as e:
            print(f"{name:8s} skipped: {str(e).splitlines()[0][:100]}")
            res.setdefault("skipped", {})[name] = str(e).splitlines()[0]
            names.remove(name)
    inputs = {n: dense.get(n, images) for n in names}
    warms = {n: dense[n][:1] if n in dense else warm for n in names}
    timed = time_methods(names, model, inputs, warms, repeats, device, p)
    for name in names:
        best, median, times, peak = timed[name]
        toks = len(dense[name]) * sides[name] ** 2 if name in dense else tokens
        nimg = len(inputs[name])
        # best of the rounds: on a shared CPU the minimum is the least disturbed run
        res["methods"][name] = {"seconds": best, "median_seconds": median, "times": times,
                                "tokens_per_s": toks / best, "images_per_s": nimg / best,
                                "peak_mib": peak}
        print(f"{name:8s} {best:8.3f} s  {toks / best:10.0f} tok/s  {nimg / best:7.2f} img/s"
              + (f"  peak {peak:.0f} MiB" if peak is not None else ""), flush=True)
    ms = res["methods"]
    for r in ms.values():
        r["vs_oracle"] = r["tokens_per_s"] / ms["oracle"]["tokens_per_s"] if "oracle" in ms else float("nan")
        base = "packed" if "packed" in ms else "navit" if "navit" in ms else None
        r["vs_packed"] = r["tokens_per_s"] / ms[base]["tokens_per_s"] if base else float("nan")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(res, out / "results.json")
    write_markdown(res, out / "results.md")
    plot(res, out / "throughput.png")
    print((out / "results.md").read_text())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixres.bench.throughput",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
