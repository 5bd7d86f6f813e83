"""`mixres bench gpu` sections: environment, attention (vs a float64 reference), out-of-memory."""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from mixres.bench.gpu_common import Context, Skip, needs

OPTIONAL = ("vit_pytorch", "ray", "webdataset", "timm", "pyarrow", "open_clip", "matplotlib")


# environment

def _chosen(device: str, dtype: torch.dtype) -> str:
    from mixres.attention import available_backends

    if device == "cuda" and not torch.cuda.is_available():
        return "skipped: needs CUDA"
    q = torch.zeros(1, 1, 64, device=device, dtype=dtype)
    return available_backends(q)[0]


def environment(ctx: Context) -> dict:
    from mixres.bench.report import env_info

    info = env_info(str(ctx.device))
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
        info["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except ImportError:
        info["varlen_attn_signature"] = "not in this torch"
    info["attention_backend"] = {"cuda bfloat16": _chosen("cuda", torch.bfloat16),
                                 "cuda float32": _chosen("cuda", torch.float32),
                                 "cpu float32": _chosen("cpu", torch.float32),
                                 "cpu bfloat16": _chosen("cpu", torch.bfloat16)}
    info["packages"] = {m.replace("_", "-"): importlib.util.find_spec(m) is not None for m in OPTIONAL}
    return info


# attention

def reference_attention(q, k, v, cu_q, cu_k, causal=False, scale=None) -> torch.Tensor:
    """Per-segment softmax attention in float64 on the CPU: the ground truth."""
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for (q0, q1), (k0, k1) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()),
                                  zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        qi = q[q0:q1].transpose(0, 1)
        ki = k[k0:k1].repeat_interleave(rep, 1).transpose(0, 1)
        vi = v[k0:k1].repeat_interleave(rep, 1).transpose(0, 1)
        s = qi @ ki.transpose(1, 2) * scale
        if causal:  # bottom-right aligned, as the backends
            i = torch.arange(lq)[:, None]
            s = s.masked_fill(torch.arange(lk)[None] > i + (lk - lq), float("-inf"))
        out[q0:q1] = (s.softmax(-1) @ vi).transpose(0, 1)
    return out


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def attention_cases(smoke: bool) -> list[dict]:
    """Mixed lengths; causal and not; GQA; separate q/k offsets (cross-attention, decoding)."""
    lens = [5, 17, 1, 64, 33, 8] if smoke else [5, 17, 1, 200, 333, 64, 1024, 77, 9, 577]
    other = [3, 40, 7, 20, 1, 12] if smoke else [3, 40, 7, 120, 1, 260, 12, 900, 31, 4]
    short = [1] * len(lens)
    return [
        {"name": "self", "lq": lens, "lk": lens, "hq": 4, "hkv": 4, "causal": False},
        {"name": "self causal", "lq": lens, "lk": lens, "hq": 4, "hkv": 4, "causal": True},
        {"name": "self causal GQA 8/2", "lq": lens, "lk": lens, "hq": 8, "hkv": 2, "causal": True},
        {"name": "cross q!=k", "lq": lens, "lk": other, "hq": 4, "hkv": 4, "causal": False},
        {"name": "cross q!=k GQA 8/2", "lq": lens, "lk": other, "hq": 8, "hkv": 2, "causal": False},
        {"name": "decode 1 query causal", "lq": short, "lk": lens, "hq": 4, "hkv": 2, "causal": True},
    ]


def _tensors(case, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(case["lq"]), sum(case["lk"])
    q = torch.randn(tq, case["hq"], d, generator=g)
    k = torch.randn(tk, case["hkv"], d, generator=g)
    v = torch.randn(tk, case["hkv"], d, generator=g)
    return [t.to(device, dtype) for t in (q, k, v)], _cu(case["lq"]).to(device), _cu(case["lk"]).to(device)


def _dtypes(ctx: Context) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if ctx.cuda else [])


def attention(ctx: Context) -> dict:
    from mixres.attention import available_backends, varlen_attention

    d = 64
    rows = []
    cases = attention_cases(ctx.smoke)
    for ci, case in enumerate(cases):
        if ctx.stop("attention cases", len(cases) - ci):
            break
        for dtype in _dtypes(ctx):
            (q, k, v), cu_q, cu_k = _tensors(case, d, ctx.device, dtype)
            ref = reference_attention(q, k, v, cu_q, cu_k, case["causal"])
            scale = ref.abs().max().clamp_min(1e-12)
            for backend in available_backends(q):
                out = varlen_attention(q, k, v, cu_q, cu_k, max(case["lq"]), max(case["lk"]),
                                       causal=case["causal"], backend=backend)
                err = float((out.double().cpu() - ref).abs().max() / scale)
                rows.append({"case": case["name"], "dtype": str(dtype).removeprefix("torch."),
                             "backend": backend, "max_rel_error": err})
    worst = {}
    for r in rows:
        key = f"{r['backend']} {r['dtype']}"
        worst[key] = max(worst.get(key, 0.0), r["max_rel_error"])
    return {"rows": rows, "max_rel_error": worst, "speed": _attention_speed(ctx)}


def _attention_speed(ctx: Context) -> dict:
    """flash vs SDPA-per-segment on one mixed-length batch (bf16 CUDA)."""
    from mixres.attention import available_backends, varlen_attention

    if not ctx.cuda:
        return {"status": "skipped", "reason": "skipped: needs CUDA (the flash backend)"}
    from mixres.workloads import mixed_grids

    lens = [h * w + 1 for h, w in mixed_grids(256, seed=0)]
    case = {"lq": lens, "lk": lens, "hq": 12, "hkv": 12}
    (q, k, v), cu, _ = _tensors(case, 64, ctx.device, torch.bfloat16)
    backends = available_backends(q)
    res = {"tokens": sum(lens), "segments": len(lens), "heads": 12, "head_dim": 64, "seconds": {}}
    for backend in backends:
        def call(backend=backend):
            return varlen_attention(q, k, v, cu, cu, max(lens), max(lens), backend=backend)
        call()
        ctx.sync()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            call()
            ctx.sync()
            times.append(time.perf_counter() - t0)
        res["seconds"][backend] = min(times)
    if "flash" in res["seconds"] and "sdpa" in res["seconds"]:
        res["flash_speedup_vs_sdpa"] = res["seconds"]["sdpa"] / res["seconds"]["flash"]
    else:
        res["flash_speedup_vs_sdpa"] = None
        res["note"] = f"backends here: {backends}"
    return res


# out of memory

class TokenLimit:
    """Wrap an encoder's forward: raise torch.OutOfMemoryError when a forward gets more than
    `limit` tokens, as a device would (the simulated OOM of the CPU runs)."""

    def __init__(self, enc, limit: int):
        self.enc, self.limit, self.real = enc, limit, enc.forward
        self.calls, self.raised = [], 0
        enc.forward = self

    def __call__(self, packed):
        n = int(packed.seqlens.sum())
        self.calls.append(n)
        if n > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError(f"simulated out of memory: {n} tokens > {self.limit}")
        return self.real(packed)


def run_oom(model, photos, out: Path, *, limit: int, budget: int, device, dtype) -> dict:
    """Embed `photos` twice with `mixres.embed.embed`: unconstrained, and with a token budget
    `budget` that does not fit under the simulated `limit`; compare the two folders."""
    import mixres
    from mixres.embed import embed, read_features

    kw = dict(pool="model", max_image_tokens=64, shard_size=8, progress=False, model_name="oom-check")
    free = mixres.load_encoder(copy.deepcopy(model), backend="packed", max_batch_tokens=None,
                               device=device, dtype=dtype)
    tight = mixres.load_encoder(copy.deepcopy(model), backend="packed", max_batch_tokens=None,
                                device=device, dtype=dtype)
    guard = TokenLimit(tight, limit)
    s_free = embed(photos, out / "free", free, max_batch_tokens=budget, **kw)
    s_tight = embed(photos, out / "tight", tight, max_batch_tokens=budget, **kw)
    a, b = read_features(out / "free"), read_features(out / "tight")
    worst = 0.0
    for x, y in zip(a.records(), b.records()):
        for s, t in ((x.tokens, y.tokens), (x.pooled, y.pooled)):
            if s is not None:
                worst = max(worst, float((s.double() - t.double()).abs().max()
                                         / s.double().abs().max().clamp_min(1e-12)))
    return {"images": s_tight["images"], "images_unconstrained": s_free["images"],
            "errors": s_tight["errors"], "same_paths": list(a) == list(b),
            "max_batch_tokens": budget, "oom_above_tokens": limit, "ooms_raised": guard.raised,
            "largest_forward_after": max(n for n in guard.calls if n <= limit),
            "max_rel_diff": worst}


def oom(ctx: Context) -> dict:
    from mixres.presets import build
    from mixres.workloads import write_photos

    model = build("tiny-vit" if ctx.smoke else "vit-b16")
    n = 12 if ctx.smoke else 48
    with tempfile.TemporaryDirectory() as tmp:
        photos = write_photos(Path(tmp) / "photos", n=n, seed=3)
        res = run_oom(model, photos, Path(tmp), limit=96, budget=1024, device=ctx.device,
                      dtype=torch.float32)
    res["model"] = "tiny-vit" if ctx.smoke else "vit-b16"
    res["dtype"] = "float32"
    res["simulated"] = True
    res["how"] = ("the encoder's forward raises torch.OutOfMemoryError above "
                  f"{res['oom_above_tokens']} tokens (simulated on every device: a real OOM on a "
                  "large GPU needs a batch too big to build quickly)")
    res["passed"] = bool(res["same_paths"] and res["errors"] == 0 and res["ooms_raised"] > 0
                         and res["images"] == res["images_unconstrained"] and res["max_rel_diff"] <= 1e-5)
    return res


__all__ = ["environment", "attention", "oom", "reference_attention", "run_oom", "TokenLimit",
           "Skip", "needs"]
