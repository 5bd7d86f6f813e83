"""Any other timm model (CNNs, Swin, MaxViT, relative-position ViTs, ...): the grouped route.

Matched last, by module: a model from `timm.models.*` that no other family file claims. It
runs whole and unmodified on batches of same-shape images (`mixres.encoders.grouped`):
tokens = `forward_features` (a (B, C, h, w) feature map flattened row-major to (h*w, C), an
NHWC map (Swin) first made NCHW, or a (B, n, D) sequence), pooled =
`forward_head(pre_logits=True)`. The output stride (pixels per token along a side, for the
resize policy and budgets) is the last `feature_info` reduction, or the patch size.
"""

from __future__ import annotations

from mixres.families import FamilySpec, register_family
from mixres.families.spec import IMAGENET_DEFAULT, Call
from mixres.families.timm_vit import patch_side, timm_call, timm_mean_std

__all__ = ["SPEC"]


def _patch(model) -> int | None:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "patch_size", None)
    return None if size is None else patch_side(size)


def _stride(model) -> int | None:
    info = getattr(model, "feature_info", None)
    if info:
        last = info[-1] if isinstance(info, list) else None
        if isinstance(last, dict) and last.get("reduction"):
            return int(last["reduction"])
    return _patch(model)


def _grid(model, H: int, W: int) -> tuple[int, int]:
    s = _stride(model) or 1
    return H // s, W // s


class _AnyTimm(FamilySpec):
    """Claims a timm model whose class no other (class-matched) family names."""

    def matches_class(self, model: object) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        from mixres.families import FAMILIES

        others = [s for s in FAMILIES.load_all().values() if s.classes and s is not self]
        return not any(FamilySpec.matches_class(s, model) for s in others)


SPEC = register_family(_AnyTimm(
    "timm", IMAGENET_DEFAULT, classes=("timm.models",),
    prefix_tokens=lambda model: int(getattr(model, "num_prefix_tokens", 0) or 0),
    tower=lambda model: model,
    patch_size=_patch,
    hidden_size=lambda model: int(model.num_features),
    mean_std_of=timm_mean_std,
    call=Call(call=timm_call, crop=_patch, stride=_stride, grid=_grid,
              min_size=lambda model: _patch(model) or 1),
    backend="grouped"))
