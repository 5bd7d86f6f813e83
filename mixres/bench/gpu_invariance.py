"""`mixres bench gpu` invariance section: every packed family, fp32 and bf16.

Per image of a mixed batch:
    fp32 error   packed fp32 (the whole mixed batch) vs the unmodified model on that image
                 alone in fp32 (the contract: <= 1e-5 relative)
    bf16 error   packed bf16 vs the fp32 model alone
    own error    the unmodified model alone in bf16 vs fp32: what bf16 costs anyway
The bar: bf16 error <= 1.5 x own error on every image (packing adds at most half of what
bf16 itself costs). Errors are max |difference| / max |reference| over the image's tokens
and its pooled output (mixres.invariance.compare_features).
"""

from __future__ import annotations

import copy

import torch

from mixres.bench.gpu_common import Context

FP32_TOL = 1e-5
BF16_BAR = 1.5


def _seeded(build):
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.random.default_generator.manual_seed(0)
        return build().eval()


def _hf(config_cls: str, model_cls: str, **cfg):
    """A random-init HF model from its config (for families without a preset)."""
    def build():
        import transformers as T
        return getattr(T, model_cls)(getattr(T, config_cls)(**cfg))
    return lambda: _seeded(build)


def _preset(name: str):
    def build():
        from mixres.presets import build as build_preset
        return build_preset(name)
    return build


TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)

# family -> builder (smoke, full); base-sized families without a preset are built from HF configs
FAMILIES = {
    "ViT": (_preset("tiny-vit"), _preset("vit-b16")),
    "DeiT": (_hf("DeiTConfig", "DeiTModel", image_size=64, patch_size=16, **TINY),
             _hf("DeiTConfig", "DeiTModel", image_size=224, patch_size=16, **BASE)),
    "CLIP": (_preset("tiny-clip"), _preset("clip-b16")),
    "SigLIP": (_preset("tiny-siglip"), _preset("siglip-b16")),
    "SigLIP2": (_preset("tiny-siglip2"), _preset("siglip2-b16")),
    "DINOv2": (_preset("tiny-dinov2"), _preset("dinov2-s14")),
    "DINOv2-reg": (_hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", image_size=56,
                       patch_size=14, num_register_tokens=4, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, mlp_ratio=2),
                   _hf("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", image_size=518,
                       patch_size=14, num_register_tokens=4, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, mlp_ratio=4)),
    "DINOv3 ViT": (_hf("DINOv3ViTConfig", "DINOv3ViTModel", image_size=64, patch_size=16,
                       num_register_tokens=4, layerscale_value=0.7, **TINY),
                   _hf("DINOv3ViTConfig", "DINOv3ViTModel", image_size=224, patch_size=16,
                       num_register_tokens=4, **BASE)),
    "NaViT": (_preset("tiny-navit"), _preset("navit-b16")),
}


def _worst(devs) -> list[float]:
    return [d.worst for d in devs]


def _encode_alone(enc, images):
    """The unmodified model on each image alone (loop backend; NaViT: one image per call)."""
    from mixres.packing import PackedFeatures

    if enc.backend == "loop":
        return enc.encode(images)
    return PackedFeatures.cat([enc.encode([img]) for img in images])


def family_row(model, images, device, navit: bool = False) -> dict:
    """fp32 / bf16 / own errors per image for one model (CPU fp32 weights in, left unchanged)."""
    import mixres
    from mixres.invariance import compare_features

    packed_b, alone_b = ("navit", "navit") if navit else ("packed", "loop")
    out = {"backend": packed_b, "reference": "navit backend, one image per call" if navit else "loop"}
    feats = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(model).to(device, dtype)
        imgs = [x.to(device, dtype) for x in images]
        with torch.inference_mode():
            packed = mixres.load_encoder(m, backend=packed_b, max_batch_tokens=None)
            alone = mixres.load_encoder(m, backend=alone_b, max_batch_tokens=None)
            feats[dtype] = (packed.encode(imgs).to("cpu", torch.float32),
                            _encode_alone(alone, imgs).to("cpu", torch.float32))
        del m
    p32, a32 = feats[torch.float32]
    p16, a16 = feats[torch.bfloat16]
    fp32 = _worst(compare_features(p32, a32))
    bf16 = _worst(compare_features(p16, a32))
    own = _worst(compare_features(a16, a32))
    bf16_direct = _worst(compare_features(p16, a16))
    ratios = [b / max(o, 1e-12) for b, o in zip(bf16, own)]
    out.update(images=len(images), tokens=int(p32.seqlens.sum()),
        fp32_max_rel=max(fp32), bf16_max_rel=max(bf16), own_bf16_max_rel=max(own),
        bf16_vs_bf16_alone_max_rel=max(bf16_direct), bf16_ratio_max=max(ratios),
        per_image={"fp32": fp32, "bf16": bf16, "own_bf16": own, "ratio": ratios},
        fp32_pass=max(fp32) <= FP32_TOL, bf16_pass=max(ratios) <= BF16_BAR)
    out["passed"] = out["fp32_pass"] and out["bf16_pass"]
    return out


def invariance(ctx: Context) -> dict:
    import importlib.util

    import mixres
    from mixres.workloads import mixed_images

    n, lo, hi = (4, 16, 64) if ctx.smoke else (12, 64, 1024)
    rows = {}
    names = list(FAMILIES)
    for i, fam in enumerate(names):
        if ctx.stop("families", len(names) - i):
            break
        if fam == "NaViT" and importlib.util.find_spec("vit_pytorch") is None:
            rows[fam] = {"status": "skipped", "reason": "skipped: needs vit-pytorch"}
            continue
        try:
            model = FAMILIES[fam][0 if ctx.smoke else 1]()
            navit = fam == "NaViT"
            p = mixres.load_encoder(model, backend="navit" if navit else "packed").patch_size
            images = mixed_images(n, seed=7, patch_size=p, min_image_tokens=lo, max_image_tokens=hi)
            rows[fam] = {"status": "ok", **family_row(model, images, ctx.device, navit=navit)}
        except Exception as e:  # one family failing does not hide the others
            rows[fam] = {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        r = rows[fam]
        shown = (f"fp32 {r['fp32_max_rel']:.1e}, bf16 {r['bf16_max_rel']:.1e} "
                 f"vs own {r['own_bf16_max_rel']:.1e} -> {'pass' if r['passed'] else 'FAIL'}"
                 if r["status"] == "ok" else r.get("reason") or r.get("error"))
        print(f"  invariance {fam}: {shown}", flush=True)
    ok = [r for r in rows.values() if r["status"] == "ok"]
    return {"families": rows, "fp32_tol": FP32_TOL, "bf16_bar": BF16_BAR,
            "passed": [f for f, r in rows.items() if r.get("passed")],
            "failed": [f for f, r in rows.items() if r["status"] == "ok" and not r["passed"]],
            "all_passed": bool(ok) and all(r["passed"] for r in ok)}
