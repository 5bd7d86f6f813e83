"""Check that a model's features for an image do not depend on what it is batched with.

`check_invariance(model, images, backend=...)` encodes `images` as one mixed batch (and
in a few other random batch compositions) with the chosen backend, and compares each
image's tokens and pooled output with the unmodified model run on that image alone
(the "loop" backend). The metric is the contract's: max |difference| relative to the
reference's max magnitude, per image.

    report = mixres.check_invariance(model, images, backend="packed")
    report.passed, report.max_error, report.per_image
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from mixres.packing import PackedFeatures

__all__ = ["InvarianceReport", "check_invariance", "relative_error", "compare_features"]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (0 when both are empty)."""
    if ref.numel() == 0:
        return 0.0
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@dataclass
class ImageDeviation:
    token_max: float
    token_mean: float
    pooled_max: float | None
    pooled_cosine: float | None

    @property
    def worst(self) -> float:
        return max(self.token_max, self.pooled_max or 0.0)


def compare_features(out: PackedFeatures, ref: PackedFeatures) -> list[ImageDeviation]:
    """Per-image deviation of `out` from `ref` (same images, same order)."""
    if out.num_images != ref.num_images:
        raise ValueError(f"compare_features: {out.num_images} images vs {ref.num_images} in the reference")
    devs = []
    for i, (a, b) in enumerate(zip(out.unpack(), ref.unpack())):
        scale = b.detach().double().abs().max().clamp_min(1e-12)
        if a.shape != b.shape:
            tmax = tmean = float("inf")
        else:
            diff = (a.detach().double() - b.detach().double()).abs()
            tmax, tmean = float(diff.max() / scale), float(diff.mean() / scale)
        pmax = pcos = None
        if out.pooled is not None and ref.pooled is not None:
            pmax = relative_error(out.pooled[i], ref.pooled[i])
            pcos = _cosine(out.pooled[i], ref.pooled[i])
        devs.append(ImageDeviation(tmax, tmean, pmax, pcos))
    return devs


@dataclass
class InvarianceReport:
    backend: str
    tol: float
    per_image: list[float]
    details: list[ImageDeviation] = field(repr=False, default_factory=list)
    compositions: int = 1

    @property
    def max_error(self) -> float:
        return max(self.per_image) if self.per_image else 0.0

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tol

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (f"invariance {verdict}: backend={self.backend}, {len(self.per_image)} images in "
                f"{self.compositions} batch compositions, max relative error {self.max_error:.2e} "
                f"(tolerance {self.tol:.0e})")


def check_invariance(model, images, backend: str = "packed", tol: float = 1e-5,
                     compositions: int = 3, seed: int = 0, reference: str = "loop",
                     **encoder_kwargs) -> InvarianceReport:
    """Verify that `backend` gives every image the features of the model on that image alone.

    model        an HF model, NaViT, a local path, hub id or preset name
    images       list of CHW tensors (normalized), PIL images or paths; at least one
    compositions how many batch compositions to try: the batch as given, then random
                 subsets in shuffled order, each image compared with its reference
    reference    the backend that runs the unmodified model one image at a time
    """
    from mixres.encoders import load_encoder
    from mixres.loading import load_model

    images = list(images)
    if not images:
        raise ValueError("check_invariance: got no images")
    model = load_model(model)
    enc = load_encoder(model, backend=backend, **encoder_kwargs)
    ref_enc = load_encoder(model, backend=reference, **encoder_kwargs)
    tensors = enc.prepare(images)
    with torch.inference_mode():
        ref = ref_enc.encode(tensors)
        worst = [0.0] * len(tensors)
        details: list[ImageDeviation | None] = [None] * len(tensors)
        rng = random.Random(seed)
        batches = [list(range(len(tensors)))]
        for _ in range(max(0, compositions - 1)):
            k = rng.randint(1, len(tensors))
            batches.append(rng.sample(range(len(tensors)), k))
        for idx in batches:
            out = enc.encode([tensors[i] for i in idx])
            for j, dev in zip(idx, compare_features(out, ref.select(idx))):
                if dev.worst >= worst[j] or details[j] is None:
                    worst[j], details[j] = dev.worst, dev
    return InvarianceReport(backend, tol, worst, details, len(batches))
