"""Where the packed encoder spends its time on a device: stage timings, the profiler's top
ops and the Python profile of one call, on the throughput workload of `mixres bench gpu`.

    python benchmarks/gpu/profile_packed.py [--device cuda] [--dtype bfloat16] [--n 256]
"""

import argparse
import copy
import cProfile
import io
import pstats
import time

import torch

import mixres
from mixres.bench import throughput
from mixres.bench.gpu_speed import _model
from mixres.packing import PackedImages
from mixres.workloads import mixed_images, oracle_images


def best(fn, sync, r=3):
    out = float("inf")
    for _ in range(r):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out = min(out, time.perf_counter() - t0)
    return out


def stages(model, enc, enc2, n, dev, dt, sync):
    """Best-of-3 timings of the whole call and of its stages on `n` mixed images."""
    from mixres.attention import use_backend

    images = [x.to(dev, dt) for x in mixed_images(n, seed=0, patch_size=16, min_image_tokens=64,
                                                  max_image_tokens=1024)]
    tokens = sum(x.shape[1] * x.shape[2] // 256 for x in images)
    oracle = [x.to(dev, dt) for x in oracle_images(tokens, patch_size=16, side=224)]
    with torch.inference_mode():
        enc.encode(images[:8]), enc2.encode(images[:8]), throughput.run_oracle(model, oracle[:2])
        t = {"encode (load_encoder(model))": best(lambda: enc.encode(images), sync),
             "encode (load_encoder(copy, device, dtype))": best(lambda: enc2.encode(images), sync),
             "oracle": best(lambda: throughput.run_oracle(model, oracle), sync)}
        with use_backend("sdpa"):
            enc.encode(images[:8])
            t["encode, sdpa backend forced"] = best(lambda: enc.encode(images), sync)
        prepared = enc.prepare(images)
        t["prepare"] = best(lambda: enc.prepare(images), sync)
        t["from_images"] = best(lambda: PackedImages.from_images(prepared, 16), sync)
        packed = PackedImages.from_images(prepared, 16).to(dev, dt)
        t["forward"] = best(lambda: enc.forward(packed), sync)
        t["run (bins + forward)"] = best(lambda: enc.run(prepared), sync)
    print(f"\n== {n} images, {tokens} tokens, {len({tuple(x.shape) for x in images})} shapes, "
          f"{len(oracle)} oracle images")
    for k, v in t.items():
        print(f"  {k:45s} {v * 1e3:9.2f} ms  {tokens / v:12.0f} tok/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--model", default="vit-b16")
    a = ap.parse_args()
    dev, dt = torch.device(a.device), getattr(torch, a.dtype)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    model = _model(a.model).to(dev, dt)
    enc = mixres.load_encoder(model, backend="packed", max_batch_tokens=None)
    enc2 = mixres.load_encoder(copy.deepcopy(model), backend="packed", max_batch_tokens=None,
                               device=dev, dtype=dt)
    for n in (a.n, a.n // 4):
        stages(model, enc, enc2, n, dev, dt, sync)
    # the profiler and the Python profile of one call on the big workload
    images = [x.to(dev, dt) for x in mixed_images(a.n, seed=0, patch_size=16, min_image_tokens=64,
                                                  max_image_tokens=1024)]
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if dev.type == "cuda" else [])
    with torch.inference_mode():
        with torch.profiler.profile(activities=acts) as prof:
            enc.encode(images)
            sync()
        ev = prof.key_averages()
        print(ev.table(sort_by="self_cpu_time_total", row_limit=30))
        if dev.type == "cuda":
            print(ev.table(sort_by="self_cuda_time_total", row_limit=20))
        print(ev.table(sort_by="count", row_limit=20))
        pr = cProfile.Profile()
        pr.enable()
        enc.encode(images)
        sync()
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
    print(s.getvalue())


if __name__ == "__main__":
    main()
