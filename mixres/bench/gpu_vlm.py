"""`mixres bench gpu` VLM section: one train step (forward + backward), packed vs padded.

Per strategy (joint_decoder, cross_attention, mot) the same VLM runs its packed batch
(`vlm(batch).loss`) and the padded baseline of mixres.bench.vlm_throughput (images padded
to the largest, samples padded to the longest, masked dense SDPA). bf16 weights on CUDA,
fp32 on the CPU. Tokens/s counts the real LM positions (the same for both), so the ratio
is the time ratio; peak memory is CUDA's max_memory_allocated per step (None on the CPU).
"""

from __future__ import annotations

import time

import torch

from mixres.bench.gpu_common import Context

STRATEGIES = ("joint_decoder", "cross_attention", "mot")


def vlm_row(ctx: Context, strategy: str, size: dict) -> dict:
    from mixres.bench.vlm_throughput import make_samples, padded_loss
    from mixres.vlm import build_vlm

    enc = {"name": "random", "hidden": size["hidden"], "patch_size": 16, "num_prefix": 1}
    vlm = build_vlm({"encoder": enc, "adapter": "mlp2", "strategy": strategy,
                     "lm": {"hidden": size["hidden"], "layers": size["layers"], "heads": size["heads"],
                            "kv_heads": size["heads"] // 2},
                     "max_seq_tokens": 4096, "max_image_tokens": size["hi"]})
    vlm = vlm.to(ctx.device, ctx.dtype).train()
    m = vlm.adapter.grid_multiple
    batch = vlm.collate(make_samples(size["samples"], 0, vlm.encoder.patch_size * m,
                                     max(1, size["lo"] // m ** 2), size["hi"] // m ** 2)).to(ctx.device)
    with torch.no_grad():
        loss_packed, loss_padded = float(vlm(batch).loss), float(padded_loss(vlm, batch))

    steps = {"packed": lambda: vlm(batch).loss, "padded": lambda: padded_loss(vlm, batch)}
    res = {"strategy": strategy, "samples": size["samples"], "lm_positions": batch.num_tokens,
           "images": int(batch.images.grid_hw.shape[0]), "loss_packed": loss_packed,
           "loss_padded": loss_padded, "methods": {}}
    for name, step in steps.items():
        times, peak = [], None
        for r in range(1 + size["rounds"]):  # the first is the warm-up
            if r > 1 and ctx.budget.exhausted():
                break
            vlm.zero_grad(set_to_none=True)
            ctx.reset_peak()
            ctx.sync()
            t0 = time.perf_counter()
            step().backward()
            ctx.sync()
            if r:
                times.append(time.perf_counter() - t0)
                p = ctx.peak_mib()
                peak = None if p is None else max(peak or 0.0, p)
        res["methods"][name] = {"seconds": min(times), "rounds": len(times), "peak_mib": peak,
                                "tokens_per_s": batch.num_tokens / min(times)}
    pk, pd = res["methods"]["packed"], res["methods"]["padded"]
    res["packed_speedup"] = pd["seconds"] / pk["seconds"]
    both = pk["peak_mib"] and pd["peak_mib"]
    res["packed_peak_vs_padded"] = pk["peak_mib"] / pd["peak_mib"] if both else None
    return res


def vlm(ctx: Context) -> dict:
    size = (dict(samples=4, hidden=64, layers=2, heads=4, lo=16, hi=64, rounds=1) if ctx.smoke else
            dict(samples=32, hidden=1024, layers=8, heads=16, lo=64, hi=1024, rounds=3))
    rows = []
    for i, strategy in enumerate(STRATEGIES):
        if ctx.stop("strategies", len(STRATEGIES) - i):
            break
        rows.append(vlm_row(ctx, strategy, size))
        r = rows[-1]
        print(f"  vlm {strategy}: packed {r['methods']['packed']['tokens_per_s']:.0f} tok/s, "
              f"padded {r['methods']['padded']['tokens_per_s']:.0f} tok/s", flush=True)
    return {"dtype": str(ctx.dtype).removeprefix("torch."), "encoder": "random stub (mixres.vlm)",
            "size": size, "strategies": rows}
