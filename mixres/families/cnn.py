"""Convolutional families (ConvNeXt v1/v2, ResNet, MobileViT, DINOv3 ConvNeXt): no patch
tokens and no packed recipe; they run whole on same-shape batches (the grouped route).

Their output grid comes from a stack of strided convs: `patch_size` is None even where the
config has one (ConvNeXt's stem, MobileViT's unfold size). ResNet and ConvNeXt checkpoints
ship ImageNet statistics although HF's processor classes default to 0.5.
"""

from __future__ import annotations

from mixres.families import Call, FamilySpec, register_family
from mixres.families.spec import IMAGENET_DEFAULT, NO_NORMALIZATION, cls_only


def _stride_convnext(cfg) -> int:
    return 4 * 2 ** (len(cfg.hidden_sizes) - 1)


def _stride_resnet(cfg) -> int:
    # embedder conv s2 + max-pool s2; every stage after the first halves the map
    first = 2 if getattr(cfg, "downsample_in_first_stage", False) else 1
    return 4 * first * 2 ** (len(cfg.hidden_sizes) - 1)


def _grid_dinov3_convnext(cfg, H: int, W: int) -> tuple[int, int]:
    # stem: conv k4 s4; every later stage starts with a conv k2 s2 (no padding: floor)
    h, w = H // 4, W // 4
    for _ in range(len(cfg.hidden_sizes) - 1):
        h, w = h // 2, w // 2
    return h, w


CONVNEXT = register_family(FamilySpec("convnext", IMAGENET_DEFAULT, model_types=("convnext", "convnextv2"),
                                      patch_tokens=False, call=Call(stride=_stride_convnext)))
RESNET = register_family(FamilySpec("resnet", IMAGENET_DEFAULT, patch_tokens=False,
                                    call=Call(stride=_stride_resnet)))
# MobileViT's processor does not normalize (it flips RGB -> BGR instead, which is not a
# mean/std matter and is left to the caller)
MOBILEVIT = register_family(FamilySpec(
    "mobilevit", NO_NORMALIZATION, patch_tokens=False, num_layers=lambda tower: 4,  # 5 stages' outputs
    call=Call(stride=lambda cfg: int(getattr(cfg, "output_stride", 32)))))
# DINOv3ConvNextModel flattens its last feature map to tokens and prepends the average-pooled
# one as a CLS-like token: (B, 1 + h*w, C)
DINOV3_CONVNEXT = register_family(FamilySpec(
    "dinov3_convnext", IMAGENET_DEFAULT, prefix_tokens=cls_only, patch_tokens=False,
    call=Call(grid=_grid_dinov3_convnext, stride=_stride_convnext)))
