"""Pieces the HF family files share: patch-size reading, the patch-model `Call`, the conv
patch projection and CLS pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixres.families.spec import Call
from mixres.packing import PackedImages

__all__ = ["cfg_patch", "grid_patch", "patch_call", "project", "conv_patches", "first_token"]


def cfg_patch(config) -> int:
    p = config.patch_size
    return int(p[0] if isinstance(p, (list, tuple)) else p)


def grid_patch(config, H: int, W: int) -> tuple[int, int]:
    p = cfg_patch(config)
    return H // p, W // p


def patch_call(**kw) -> Call:
    """The whole-model call of a patch-embedding family: crop to whole patches, one token per
    patch, at least one patch per side."""
    return Call(**{"crop": cfg_patch, "grid": grid_patch, "stride": cfg_patch, "min_size": cfg_patch, **kw})


def project(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """All packed patches through the patch embedding as one GEMM."""
    return F.linear(patches, weight.flatten(1), bias)


def conv_patches(packed: PackedImages, conv: nn.Conv2d) -> torch.Tensor:
    """(N, D) patch tokens of a stride-p conv patch embedding, packed patches cast to its dtype."""
    return project(packed.patches.to(conv.weight.dtype), conv.weight, conv.bias)


def first_token(tower, tokens: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """(B, D): each image's first token (DINOv2/v3's pooler_output: the normed CLS)."""
    return tokens[cu[:-1].long()]
