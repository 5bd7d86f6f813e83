"""`mixres bench gpu` speed sections: throughput (+ chunk sweep), torch.compile, embed."""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mixres.bench.gpu_common import Context

ENCODER_METHODS = ("packed", "grouped", "loop", "masked")


def _vit_l14():
    import transformers as T
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.random.default_generator.manual_seed(0)
        return T.ViTModel(T.ViTConfig(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24,
                                      num_attention_heads=16, intermediate_size=4096)).eval()


def _model(name: str):
    if name == "vit-l14":
        return _vit_l14()
    from mixres.presets import build
    return build(name)


def _runner(method: str, model):
    """A no-argument-but-images callable for one method (encoders built once, outside timing)."""
    import mixres
    from mixres.bench import throughput

    if method in ENCODER_METHODS:
        enc = mixres.load_encoder(model, backend=method, max_batch_tokens=None)
        return lambda images: enc.encode(images)
    fn = {"padded": throughput.run_padded, "oracle": throughput.run_oracle}[method]
    p = mixres.load_encoder(model, backend="packed").patch_size
    return lambda images: fn(model, images, patch_size=p)


def time_calls(ctx: Context, fns: dict, inputs: dict, warm: dict, repeats: int) -> dict:
    """Warm every fn up, then `repeats` rounds, round-robin (noise hits all alike); best and
    median seconds and peak memory per fn."""
    times = {n: [] for n in fns}
    peaks: dict[str, float | None] = {}
    with torch.inference_mode():
        for n, fn in fns.items():
            fn(warm[n])
            ctx.sync()
        for r in range(repeats):
            if r and ctx.budget.exhausted():
                ctx.notes.append(f"time budget used: {r} of {repeats} timed rounds")
                break
            for n, fn in fns.items():
                ctx.reset_peak()
                t0 = time.perf_counter()
                fn(inputs[n])
                ctx.sync()
                times[n].append(time.perf_counter() - t0)
                p = ctx.peak_mib()
                peaks[n] = None if p is None else max(peaks.get(n) or 0.0, p)
    return {n: {"seconds": min(t), "median_seconds": statistics.median(t), "rounds": len(t),
                "peak_mib": peaks.get(n)} for n, t in times.items()}


def throughput_model(ctx: Context, name: str, n: int, repeats: int) -> dict:
    import mixres
    from mixres.workloads import mixed_images, oracle_images

    model = _model(name).to(ctx.device, ctx.dtype)
    p = mixres.load_encoder(model, backend="packed").patch_size
    lo, hi = (16, 256) if ctx.smoke else (64, 1024)
    images = [x.to(ctx.device, ctx.dtype) for x in mixed_images(n, seed=0, patch_size=p, min_image_tokens=lo,
                                                                 max_image_tokens=hi)]
    tokens = sum(x.shape[1] * x.shape[2] // p ** 2 for x in images)
    oracle = [x.to(ctx.device, ctx.dtype) for x in oracle_images(tokens, patch_size=p, side=224 // 16 * p)]
    oracle_tokens = len(oracle) * (224 // 16) ** 2
    fns, skipped = {}, {}
    for method in ("packed", "oracle", "padded", "grouped", "loop", "masked"):
        try:  # the masked backend patches its model: it gets a copy of its own
            fns[method] = _runner(method, copy.deepcopy(model) if method == "masked" else model)
        except (TypeError, ValueError) as e:  # masked is ViT-only
            skipped[method] = f"skipped: {str(e).splitlines()[0][:160]}"
    inputs = {m: oracle if m == "oracle" else images for m in fns}
    warm = {m: oracle[:2] if m == "oracle" else images[:2 if ctx.smoke else 8] for m in fns}
    timed = time_calls(ctx, fns, inputs, warm, repeats)
    for m, r in timed.items():
        toks = oracle_tokens if m == "oracle" else tokens
        r.update(tokens_per_s=toks / r["seconds"], images_per_s=len(inputs[m]) / r["seconds"])
    base = timed["packed"]
    ratios = {f"packed_vs_{m}": base["tokens_per_s"] / r["tokens_per_s"]
              for m, r in timed.items() if m != "packed"}
    if timed.get("padded", {}).get("peak_mib") and base["peak_mib"]:
        ratios["packed_peak_vs_padded"] = base["peak_mib"] / timed["padded"]["peak_mib"]
    # chunk-budget sweep of the packed encoder
    sweep = []
    budgets = [None, 256, 128, 64] if ctx.smoke else [None, 65536, 32768, 16384, 8192, 4096]
    for i, b in enumerate(budgets):
        if ctx.stop("chunk budgets", len(budgets) - i):
            break
        enc = mixres.load_encoder(model, backend="packed", max_batch_tokens=b)
        t = time_calls(ctx, {"packed": enc.encode}, {"packed": images}, {"packed": images[:2]},
                       1 if ctx.smoke else 3)["packed"]
        sweep.append({"max_batch_tokens": b, **t, "tokens_per_s": tokens / t["seconds"]})
    return {"model": name, "dtype": str(ctx.dtype).removeprefix("torch."), "images": n, "tokens": tokens,
            "distinct_shapes": len({tuple(x.shape) for x in images}), "oracle_images": len(oracle),
            "oracle_tokens": oracle_tokens, "methods": timed, "skipped_methods": skipped,
            "ratios": ratios, "chunk_sweep": sweep}


def throughput(ctx: Context) -> dict:
    plan = [("tiny-vit", 8, 1)] if ctx.smoke else [("vit-b16", 256, 3), ("vit-l14", 256, 2)]
    rows = []
    for i, (name, n, repeats) in enumerate(plan):
        if ctx.stop("models", len(plan) - i):
            break
        rows.append(throughput_model(ctx, name, n, repeats))
        print(f"  throughput {name}: " + ", ".join(f"{m} {r['tokens_per_s']:.0f} tok/s"
                                                   for m, r in rows[-1]["methods"].items()), flush=True)
    return {"workload": "mixed-N (mixres.workloads.mixed_images), oracle: 224x224-equivalent images",
            "peak_memory": ("torch.cuda.max_memory_allocated per call" if ctx.cuda
                            else "None: not measured on the CPU"),
            "models": rows}


# torch.compile

def compile_blocks(model, backend) -> str:
    """torch.compile(dynamic=True) each block of the model's largest nn.ModuleList (its
    transformer layers), in place: the blocks are the compute, and the packing code around
    them (lengths, offsets, position tables) is data-dependent Python that would only break
    graphs. Returns the list's name."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to compile")
    name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    for block in blocks:
        block.compile(dynamic=True, backend=backend)
    return f"{name} ({len(blocks)} x {type(blocks[0]).__name__})"


def compile_check(model, batches, device, dtype, backend: str) -> dict:
    """The packed encoder eager vs under torch.compile(dynamic=True): the same features on
    every batch (of different compositions), and how many frames were compiled.

    Duck sizing is off: it would tie sizes that are equal by chance in the first batch (the
    number of heads and of offsets, say) and recompile when the next batch differs."""
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(use_duck_shape=False):
        return _compile_check(model, batches, device, dtype, backend)


def _compile_check(model, batches, device, dtype, backend: str) -> dict:
    import mixres
    from mixres.invariance import compare_features

    try:
        from torch._dynamo.testing import CompileCounterWithBackend
    except ImportError:  # an older torch: count nothing, still compile
        CompileCounterWithBackend = None
    torch._dynamo.reset()
    eager = mixres.load_encoder(copy.deepcopy(model), backend="packed", max_batch_tokens=None,
                                device=device, dtype=dtype)
    comp = mixres.load_encoder(copy.deepcopy(model), backend="packed", max_batch_tokens=None,
                               device=device, dtype=dtype)
    # below fp32, compiled and eager each round differently (inductor fuses, keeps fp32
    # intermediates): both are held to the fp32 eager features, as the invariance bar is
    fp32 = None if dtype == torch.float32 else mixres.load_encoder(
        copy.deepcopy(model), backend="packed", max_batch_tokens=None, device=device, dtype=torch.float32)
    counter = CompileCounterWithBackend(backend) if CompileCounterWithBackend else backend
    blocks = compile_blocks(comp.model, counter)
    rows, t_compile = [], time.perf_counter()

    def worst(a, b):
        return max(d.worst for d in compare_features(a.to("cpu", torch.float32), b.to("cpu", torch.float32)))

    for i, images in enumerate(batches):
        images = [x.to(device, dtype) for x in images]
        with torch.inference_mode():
            ref = eager.encode(images)
            t0 = time.perf_counter()
            out = comp.encode(images)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            ref32 = None if fp32 is None else fp32.encode([x.float() for x in images])
        row = {"batch": i, "images": len(images), "tokens": int(out.seqlens.sum()),
               "seconds": dt, "max_rel_vs_eager": worst(out, ref),
               "frames_compiled_so_far": getattr(counter, "frame_count", None)}
        if ref32 is not None:
            row.update(compiled_vs_fp32=worst(out, ref32), eager_vs_fp32=worst(ref, ref32))
        rows.append(row)
    res = {"backend": backend, "dynamic": True, "compiled": blocks, "batches": rows,
           "frames_compiled": getattr(counter, "frame_count", None),
           "compile_and_run_seconds": time.perf_counter() - t_compile,
           "max_rel_vs_eager": max(r["max_rel_vs_eager"] for r in rows)}
    if fp32 is not None:
        res["worst_ratio_vs_eager_own_error"] = max(r["compiled_vs_fp32"] / max(r["eager_vs_fp32"], 1e-12)
                                                    for r in rows)
    # steady state on the first batch: eager vs compiled, best of 3
    images = [x.to(device, dtype) for x in batches[0]]
    for name, enc in (("eager", eager), ("compiled", comp)):
        best = float("inf")
        with torch.inference_mode():
            for _ in range(3):
                t0 = time.perf_counter()
                enc.encode(images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t0)
        res[f"{name}_seconds"] = best
    res["compiled_speedup"] = res["eager_seconds"] / res["compiled_seconds"]
    res["frames_compiled_after_timing"] = getattr(counter, "frame_count", None)
    return res


def compile_section(ctx: Context) -> dict:
    from mixres.workloads import mixed_images

    name, n = ("tiny-vit", 6) if ctx.smoke else ("vit-b16", 64)
    lo, hi = (16, 64) if ctx.smoke else (64, 1024)
    model = _model(name)
    images = mixed_images(3 * n, seed=11, patch_size=16, min_image_tokens=lo, max_image_tokens=hi)
    # three batches of different sizes and compositions: a recompile per batch would show
    batches = [images[:n], images[n:n + n // 2], images[n + n // 2:]]
    # inductor on CUDA; on the CPU smoke run aot_eager (dynamo + AOT autograd, no C++ build)
    backend = "inductor" if ctx.cuda else "aot_eager"
    res = compile_check(model, batches, ctx.device, ctx.dtype, backend)
    res.update(model=name, dtype=str(ctx.dtype).removeprefix("torch."))
    if ctx.dtype == torch.float32:
        res.update(tol=1e-5, passed=res["max_rel_vs_eager"] <= 1e-5)
    else:  # the invariance bar: within 1.5x eager's own error against fp32
        res.update(tol_ratio=1.5, passed=res["worst_ratio_vs_eager_own_error"] <= 1.5)
    return res


# embed

def embed_check(model, folder: Path, out: Path, device, dtype, budget: int, workers: int,
                decode: str = "pil") -> dict:
    """`mixres.embed.embed` end to end vs the same encoder on the pre-decoded tensors."""
    import mixres
    from mixres.embed import embed

    enc = mixres.load_encoder(model, backend="packed", max_batch_tokens=budget, device=device, dtype=dtype)
    paths = sorted(str(p) for p in folder.iterdir())
    t0 = time.perf_counter()
    s = embed(folder, out, enc, max_batch_tokens=budget, num_workers=workers, progress=False,
              model_name="bench-gpu", pool="model", decode=decode)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    tensors = enc.prepare(paths)  # decode + resize + normalize, once, outside the timing
    decode = time.perf_counter() - t0
    with torch.inference_mode():
        enc.encode(tensors[:8])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        enc.encode(tensors)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t_enc = time.perf_counter() - t0
    return {"files": len(paths), "images": s["images"], "errors": s["errors"], "tokens": s["tokens"],
            "embed_wall_seconds": wall, "embed_images_per_s": s["images"] / wall,
            "embed_encode_images_per_s": s["images"] / max(s["stream_seconds"], 1e-9),
            "encoder_images_per_s": len(tensors) / t_enc, "decode_seconds_one_process": decode,
            "embed_vs_encoder": (s["images"] / wall) / (len(tensors) / t_enc),
            "max_batch_tokens": budget, "num_workers": workers, "decode": decode}


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` JPEGs of mixed sizes (40-480 x 48-640 px), fast to make: random crops of one smooth
    noise picture, each tinted, encoded on a few threads (PIL releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((800, 600), Image.BICUBIC)).astype(np.int16)
    base = (base + rng.integers(-12, 13, base.shape)).clip(0, 255).astype(np.uint8)
    jobs = []
    for i in range(n):
        h, w = int(rng.integers(40, 481)), int(rng.integers(48, 641))
        y, x = int(rng.integers(0, 600 - h + 1)), int(rng.integers(0, 800 - w + 1))
        tint = rng.uniform(0.5, 1.0, 3)
        jobs.append((folder / f"img_{i:05d}.jpg", y, x, h, w, tint))

    def save(job):
        path, y, x, h, w, tint = job
        Image.fromarray((base[y:y + h, x:x + w] * tint).astype(np.uint8)).save(path, quality=90)
        return path

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(save, jobs))


def embed_section(ctx: Context) -> dict:
    from mixres.decode import get_decoder

    name, n = ("tiny-vit", 16) if ctx.smoke else ("vit-b16", 2000)
    workers = 0 if ctx.smoke else max(1, min(8, (os.cpu_count() or 2) - 2))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = Path(tmp) / "photos"
        write_jpegs(folder, n=n, seed=5)
        gen = time.perf_counter() - t0
        budget = 2048 if ctx.smoke else 65536
        model = _model(name)
        res = embed_check(model, folder, Path(tmp) / "out", ctx.device, ctx.dtype, budget, workers)
        # the other decoders on the same files: `fast` in the DataLoader workers, `cuda` batched
        # on the GPU in the main process (the row a GPU box is decode-bound without)
        res["decoders"] = {"pil": {k: res[k] for k in ("embed_images_per_s", "embed_vs_encoder")}}
        for decode in ("fast", "cuda"):
            if decode == "cuda" and ctx.device.type != "cuda":
                res["decoders"][decode] = {"status": "skipped", "reason": "skipped: needs CUDA"}
                continue
            try:
                get_decoder(decode)
            except ValueError as e:  # simplejpeg / torchvision missing: this row only
                res["decoders"][decode] = {"status": "skipped", "reason": f"skipped: {e}"}
                continue
            row = embed_check(model, folder, Path(tmp) / f"out-{decode}", ctx.device, ctx.dtype, budget,
                              workers, decode=decode)
            res["decoders"][decode] = {k: row[k] for k in ("embed_images_per_s", "embed_vs_encoder")}
    res.update(model=name, dtype=str(ctx.dtype).removeprefix("torch."), generate_seconds=gen,
               decode="pil in DataLoader workers (see `decoders` for fast and cuda)")
    return res
