"""Embedding pipeline benchmark: decode per core, the encoder alone, and `mixres embed` end to end.

Workload: the mixed-JPEG set (mixres.workloads.write_mixed_jpegs): N photo-like JPEGs with
both sides in 200-1000 px and the mixed-N aspect ratios (log-uniform in [0.5, 2]), generated
from --seed. What is measured, all in one run on the same files:

    decode     images/s of each decoder (mixres.decode) in this one process with one torch
               thread: images/s per core. Bytes are read beforehand (no disk in the timing).
               Each round runs each decoder over the whole set in turn; each image's fastest
               of --rounds counts.
    pixels     how far `fast` is from `pil` in [0, 1] pixel space (mean and max |d|) on the
               set, on scikit-image's bundled photographs saved as JPEG, and on a few large
               JPEGs (where the draft-mode route starts)
    encoder    the encoder's own images/s on pre-decoded tensors, shard by shard as embed runs
    pipeline   `mixres embed` images/s (images / the shard loop's seconds) per decoder and
               --num-workers, and with `--engine ray` on a local Ray (decode tasks on every core,
               one encoder actor), and its fraction of the encoder's own rate timed just
               before and after it

Writes results.json (`decode_images_per_s_per_core` keyed by decoder), results.md and
embed.png into --out, with the machine, versions, the load average and the command. The
images are written to a temporary folder (deterministic from --seed) and removed after.

    mixres bench embed --out out/bench-embed              # vit-b16, a few minutes on 2 cores
    mixres bench embed --quick --out out/bench-embed-q    # tiny-vit, 12 images
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixres.bench.report import command_line, env_info, write_json


def available_decoders() -> list[str]:
    from mixres.decode import DECODERS
    gpu = torch.cuda.is_available()
    return [n for n in ("pil", "fast", "cuda") if n in DECODERS and (n != "cuda" or gpu)]


# decode

def time_decoders(names, blobs, spec, rounds) -> dict:
    """{name: images/s} with one torch thread: n / the sum over images of each image's fastest
    of `rounds` decodes. Each round runs every decoder over the whole set in turn, the order
    reversed every other round.

    Per-image minima, not the best whole round: on a shared 2-core VM the machine's speed
    drifts by +-25 % within seconds, which moved a best-round ratio between 2.6x and 4.3x
    on the same code; the per-image minimum is what each decode costs on an idle core.
    A decoder runs a whole pass at a time because a worker runs one decoder: alternating
    decoders image by image let PIL's buffers evict the fast route's from the caches
    (measured: fast 15 % slower, pil unchanged). A batched (GPU) decoder is timed per batch.
    """
    from mixres.decode import get_decoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decs = {n: get_decoder(n) for n in names}
        for d in decs.values():
            _decode_all(d, blobs[:2], spec)  # imports, kernels, caches
        step = spec["batch"] if any(d.device.type == "cuda" for d in decs.values()) else 1
        units = [blobs[i:i + step] for i in range(0, len(blobs), step)]
        best = {n: [float("inf")] * len(units) for n in names}
        for r in range(rounds):
            for n, d in (list(decs.items()) if r % 2 == 0 else list(decs.items())[::-1]):
                for i, unit in enumerate(units):
                    t0 = time.perf_counter()
                    _decode_all(d, unit, spec)
                    best[n][i] = min(best[n][i], time.perf_counter() - t0)
        return {n: len(blobs) / sum(v) for n, v in best.items()}
    finally:
        torch.set_num_threads(threads)


def _decode_all(dec, blobs, spec) -> list:
    if dec.device.type == "cuda":  # batched, as a GPU decoder is meant to run
        out = []
        for i in range(0, len(blobs), spec["batch"]):
            out += dec.preprocess_many(blobs[i:i + spec["batch"]], **spec["kw"])
        torch.cuda.synchronize()
        return out
    return [dec.preprocess(b, **spec["kw"]) for b in blobs]


def pixel_distance(blobs, kw) -> dict:
    """fast vs pil in [0, 1] pixel space: mean over images of the mean |d|, max |d|, in 1/255 units."""
    from mixres.decode import get_decoder

    pil, fast = get_decoder("pil"), get_decoder("fast")
    means, top = [], 0.0
    for b in blobs:
        a, f = pil.pixels(b, **kw), fast.pixels(b, **kw)
        if a.shape != f.shape:
            raise AssertionError(f"decoders disagree on the target grid: {tuple(a.shape)} vs "
                                 f"{tuple(f.shape)}")
        d = (a - f).abs()
        means.append(float(d.mean()))
        top = max(top, float(d.max()))
    return {"images": len(blobs), "mean_abs_255": 255 * sum(means) / len(means),
            "max_mean_abs_255": 255 * max(means), "max_abs_255": 255 * top}


def _route(blob, kw) -> str:
    from mixres.decode import _plan
    return _plan(blob, kw["patch_size"], kw["min_image_tokens"], kw["max_image_tokens"], (255,) * 3,
                 None).route


def photo_blobs(limit: int | None = None) -> list[bytes] | None:
    """scikit-image's bundled photographs as JPEG (quality 90) bytes; None without scikit-image."""
    import io

    try:
        from skimage import data
    except ImportError:
        return None
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "retina", "colorwheel", "camera", "coins", "moon", "brick", "grass", "gravel", "clock"]
    out = []
    for n in names[:limit]:
        b = io.BytesIO()
        Image.fromarray(getattr(data, n)()).save(b, "JPEG", quality=90)
        out.append(b.getvalue())
    return out


# encoder and pipeline

def time_encoder(enc, tensors, shard_size, pool) -> float:
    """images/s of the encoder alone on pre-decoded tensors, in shards as embed cuts them."""
    from mixres.packing import pool_features

    shards = [tensors[i:i + shard_size] for i in range(0, len(tensors), shard_size)]
    with torch.no_grad():
        pool_features(enc.encode(shards[0][:2]), pool)  # warm-up
        t0 = time.perf_counter()
        for s in shards:
            pool_features(enc.encode(s), pool)
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
    return len(tensors) / (time.perf_counter() - t0)


def time_pipeline(enc, model_name, folder, decode, workers, args, engine="local") -> dict:
    """One `mixres embed` run into a temporary folder. The Ray engine runs on the local Ray
    the caller started (its start-up is not timed; the engine's clock starts when its first
    actor has loaded the model, as the local engine's starts after loading)."""
    from mixres.embed import embed

    out = Path(tempfile.mkdtemp(prefix="mixres-bench-embed-"))
    kw = ({"engine": "ray", "ray_cpus_per_actor": args.ray_cpus_per_actor} if engine == "ray"
          else {"num_workers": workers})
    try:
        s = embed(str(folder), str(out / "feats"), enc, model_name=model_name, pool=args.pool,
                  min_image_tokens=args.min_image_tokens, max_image_tokens=args.max_image_tokens,
                  max_batch_tokens=args.max_batch_tokens, shard_size=args.shard_size,
                  decode=decode, progress=False, **kw)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if s["errors"]:
        raise RuntimeError(f"mixres embed --engine {engine} --decode {decode}: {s['errors']} inputs failed")
    # the stream: from the first loaded model to the last shard (start-up is not the pipeline)
    row = {"engine": engine, "decode": decode, "workers": workers if engine == "local" else None,
           "images_per_s": s["images"] / max(s["stream_seconds"], 1e-9), "seconds": s["stream_seconds"],
           "images": s["images"]}
    if engine == "ray":
        row.update(ray_actors=s["encoders"], ray_cpus_per_actor=args.ray_cpus_per_actor)
    return row


def _start_local_ray():
    """(ray, started by us, why not): the Ray engine's own local Ray for the Ray rows (a running
    session is used and left running), or the reason there is none."""
    from mixres.embed.engines.ray_data import import_ray, start_ray

    try:
        ray = import_ray()
    except ValueError as e:  # Ray Data is not installed: the row says how to get it
        return None, False, f"not run ({e})"
    return ray, start_ray(ray, None), None


# report

def write_markdown(res: dict, path: Path) -> None:
    d = res["decode_images_per_s_per_core"]
    lines = [f"# Embedding pipeline: {res['model']} {res['dtype']} on {res['device_name']}", "",
             f"{res['n']} mixed-size JPEGs (200-1000 px, aspect 0.5-2), {res['tokens']} tokens; "
             f"tokens per image in [{res['min_image_tokens']}, {res['max_image_tokens']}], "
             f"shards of {res['shard_size']}. Load average before / after: "
             f"{res['load_before']} / {res['load_after']} ({res['env']['cpu_count']} cores).", "",
             "## Decode (one process, one torch thread: images/s per core)", "",
             "| decoder | images/s per core | vs pil |", "|---|---|---|"]
    for n, v in d.items():
        lines.append(f"| {n} | {v:.1f} | {v / d['pil']:.2f} |" if "pil" in d else f"| {n} | {v:.1f} | - |")
    lines += ["", "## Pixel distance of fast from pil ([0, 1] pixels, in units of 1/255)", "",
              "| images | count | mean abs | worst image's mean | max abs |", "|---|---|---|---|---|"]
    for name, p in res["pixel_distance"].items():
        if "status" in p:
            lines.append(f"| {name} | - | {p['status']} | | |")
        else:
            lines.append(f"| {name} | {p['images']} | {p['mean_abs_255']:.3f} | "
                         f"{p['max_mean_abs_255']:.3f} | {p['max_abs_255']:.0f} |")
    enc = res["encoder_images_per_s"]
    lines += ["", "## Pipeline (`mixres embed`) vs the encoder alone", "",
              f"Encoder alone on pre-decoded tensors: **{enc:.2f} images/s** at the start. Each row "
              "is held against the encoder alone timed just before and after it (their mean), at "
              "the threads that row's encoder has.", "",
              "| engine | decode | workers | images/s | encoder alone around it | fraction of encoder |",
              "|---|---|---|---|---|---|"]
    for r in res["pipeline"]:
        if "status" in r:
            lines.append(f"| {r['engine']} | {r['decode']} | - | {r['status']} | - | - |")
            continue
        workers = r["workers"] if r["engine"] == "local" else (
            f"decode tasks on {res['env']['cpu_count']} CPUs, {r['ray_actors']} encoder actor of "
            f"{r['ray_cpus_per_actor']} CPU")
        lines.append(f"| {r['engine']} | {r['decode']} | {workers} | {r['images_per_s']:.2f} | "
                     f"{r['encoder_images_per_s']:.2f} | {r['fraction_of_encoder']:.2f} |")
    lines += ["", f"command: `{res['command']}`", ""]
    path.write_text("\n".join(lines))


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    d = res["decode_images_per_s_per_core"]
    a.bar(list(d), list(d.values()), color=["tab:gray" if n == "pil" else "tab:green" for n in d])
    a.set_ylabel("images / s per core")
    a.set_title("decode + resize + normalize")
    rows = [r for r in res["pipeline"] if "status" not in r]
    b.bar([f"{r['decode']}\nw={r['workers']}" if r["engine"] == "local" else f"{r['decode']}\nray"
           for r in rows], [r["fraction_of_encoder"] for r in rows],
          color=["tab:gray" if r["decode"] == "pil" else "tab:green" for r in rows])
    b.axhline(1.0, color="tab:red", ls="--", label="encoder alone (timed around each run)")
    b.set_ylabel("images / s, fraction of the encoder's")
    b.set_title(f"mixres embed, {res['model']} ({res['device_name']})")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# entry points

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit-b16", help="preset name, local path or hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-n", type=int, default=32, help="JPEGs in the mixed set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoders", default=None, help="comma-separated (default: every available one)")
    p.add_argument("--pipeline-decoders", default="pil,fast", help="decoders run through mixres embed")
    p.add_argument("--workers", default="0,1,2", help="--num-workers values for mixres embed")
    p.add_argument("--engines", default="local,ray",
                   help="local (each --workers value) and/or ray (a local Ray on every core)")
    p.add_argument("--ray-cpus-per-actor", type=int, default=1,
                   help="the Ray rows' encoder actor CPUs (its torch threads); the rest decode")
    p.add_argument("--rounds", type=int, default=3, help="decode rounds (best is kept)")
    p.add_argument("--min-image-tokens", type=int, default=1)
    p.add_argument("--max-image-tokens", type=int, default=1024)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--shard-size", type=int, default=8, help="small, so decode and encode overlap")
    p.add_argument("--pool", default="model")
    p.add_argument("--quick", action="store_true", help="tiny-vit, 12 images, 2 rounds (smoke run)")
    p.add_argument("--out", default="out/bench-embed")


def run(args) -> int:
    if args.quick:
        args.model, args.n, args.rounds = "tiny-vit", 12, 2
    names = [x for x in (args.decoders or ",".join(available_decoders())).split(",") if x]
    workers = [int(x) for x in args.workers.split(",") if x]
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="mixres-bench-embed-") as tmp:
        return _run(args, names, workers, out, Path(tmp))


def _run(args, names, workers, out: Path, tmp: Path) -> int:
    from mixres.encoders import load_encoder
    from mixres.images import preprocess
    from mixres.workloads import write_mixed_jpegs

    folder = tmp / "images"
    blobs = [f.read_bytes() for f in write_mixed_jpegs(folder, n=args.n, seed=args.seed)]
    load_before = [round(x, 2) for x in os.getloadavg()]

    enc = load_encoder(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                       max_batch_tokens=args.max_batch_tokens, min_image_tokens=args.min_image_tokens,
                       max_image_tokens=args.max_image_tokens)
    mean, std = enc.mean_std
    kw = {"patch_size": enc.patch_size, "min_image_tokens": args.min_image_tokens,
          "max_image_tokens": args.max_image_tokens}
    spec = {"kw": {**kw, "mean": tuple(mean), "std": tuple(std)}, "batch": args.shard_size}
    decode = time_decoders(names, blobs, spec, args.rounds)
    for n, v in decode.items():
        print(f"decode {n:5s} {v:8.1f} images/s per core", flush=True)

    pix = {"mixed JPEGs": pixel_distance(blobs, kw)}
    photos = photo_blobs(4 if args.quick else None)
    pix["scikit-image photos (JPEG q90)"] = (pixel_distance(photos, kw) if photos is not None
                                             else {"status": "not measured (scikit-image not installed)"})
    large = [f.read_bytes() for f in write_mixed_jpegs(tmp / "large", n=2 if args.quick else 4,
                                                       seed=args.seed + 1, sides=(2400, 4000))]
    routes = {_route(b, kw) for b in large}
    pix[f"large JPEGs 2400-4000 px ({'/'.join(sorted(routes))} route)"] = pixel_distance(large, kw)
    for name, p in pix.items():
        if "mean_abs_255" in p:
            print(f"pixels {name}: mean |fast - pil| = {p['mean_abs_255']:.3f}/255, "
                  f"max {p['max_abs_255']:.0f}/255")

    tensors = [preprocess(b, mean=mean, std=std, **kw) for b in blobs]
    tokens = sum(t.shape[1] * t.shape[2] // enc.patch_size ** 2 for t in tensors)
    enc_rate = time_encoder(enc, tensors, args.shard_size, args.pool)
    print(f"encoder alone {enc_rate:.2f} images/s", flush=True)
    pipeline = []
    engines = [x for x in args.engines.split(",") if x]
    unknown = set(engines) - {"local", "ray"}
    if unknown:
        raise SystemExit(f"--engines: unknown {sorted(unknown)}; choose from local, ray")
    ray, started, why_not = _start_local_ray() if "ray" in engines else (None, False, None)
    # each row is held against the encoder alone timed just before and just after it (their
    # mean): this VM's speed drifts by +-25 % over a minute, which against one early encoder
    # timing moved the same configuration between 0.66 and 0.82. The Ray rows use the actor's
    # own threads (on CPU the rest of the cores decode), the local rows this process's. A
    # timing right after one row is the timing right before the next at the same threads.
    threads = torch.get_num_threads()
    prev = (threads, enc_rate)  # the latest encoder timing and its threads: nothing ran since

    def threads_of(engine: str) -> int:
        return args.ray_cpus_per_actor if engine == "ray" and enc.device.type == "cpu" else threads

    def encoder_rate(n: int) -> float:
        torch.set_num_threads(n)
        try:
            return time_encoder(enc, tensors, args.shard_size, args.pool)
        finally:
            torch.set_num_threads(threads)

    try:
        for dec in [x for x in args.pipeline_decoders.split(",") if x]:
            runs = [("local", w) for w in workers if "local" in engines]
            runs += [("ray", None)] if "ray" in engines else []
            for engine, w in runs:
                if engine == "ray" and ray is None:
                    pipeline.append({"engine": "ray", "decode": dec, "workers": None, "status": why_not})
                    continue
                n = threads_of(engine)
                before = prev[1] if prev[0] == n else encoder_rate(n)
                r = time_pipeline(enc, args.model, folder, dec, w, args, engine)
                prev = (n, encoder_rate(n))
                r["encoder_images_per_s"] = (before + prev[1]) / 2
                r["fraction_of_encoder"] = r["images_per_s"] / r["encoder_images_per_s"]
                pipeline.append(r)
                how = "--engine ray" if engine == "ray" else f"--num-workers {w}"
                print(f"embed --decode {dec} {how}: {r['images_per_s']:.2f} images/s "
                      f"({r['fraction_of_encoder']:.2f} of the encoder's "
                      f"{r['encoder_images_per_s']:.2f} around it)", flush=True)
    finally:
        if started:
            ray.shutdown()

    device = torch.device(args.device)
    res = {"model": args.model, "dtype": args.dtype, "device": str(device), "n": args.n, "tokens": tokens,
           "min_image_tokens": args.min_image_tokens, "max_image_tokens": args.max_image_tokens,
           "max_batch_tokens": args.max_batch_tokens, "shard_size": args.shard_size,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"CPU ({torch.get_num_threads()} threads)",
           "decode_images_per_s_per_core": decode,
           "fast_vs_pil": decode["fast"] / decode["pil"] if {"fast", "pil"} <= set(decode) else None,
           "pixel_distance": pix, "encoder_images_per_s": enc_rate, "pipeline": pipeline,
           "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
           "env": env_info(str(device)), "command": command_line()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(res, out / "results.json")
    write_markdown(res, out / "results.md")
    plot(res, out / "embed.png")
    print((out / "results.md").read_text())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixres.bench.embed", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
