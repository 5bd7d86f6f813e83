"""Introspection of heterogeneous vision backbones: the seed toolkit's names for the model facts.

Each answer comes from the model's `mixres.families.facts.ModelFacts` (computed once per
model from its family spec and config); this module only keeps the names the seed toolkit's
users call, plus `pool_hidden_dim`, the seed's mean over token / spatial positions. Nothing
in the engine imports it.
"""

from __future__ import annotations

import torch
from torch import nn

from mixres.families import accepts, family, forward_kwargs, model_args_dict, vision_config, vision_tower
from mixres.families.facts import mean_std_of, model_facts
from mixres.families.siglip2 import naflex_patches
from mixres.families.spec import (
    IMAGENET_DEFAULT,
    IMAGENET_STANDARD,
    NO_NORMALIZATION,
    OPENAI_CLIP,
    MeanStd,
    UnknownImageEncoderError,
)

__all__ = [
    "UnknownImageEncoderError",
    "accepts",
    "family",
    "forward_kwargs",
    "hidden_size",
    "image_encoder_size",
    "image_mean_std",
    "model_args_dict",
    "naflex_patches",
    "num_prefix_tokens",
    "patch_size",
    "pool_hidden_dim",
    "vision_config",
    "vision_tower",
    "IMAGENET_DEFAULT", "IMAGENET_STANDARD", "OPENAI_CLIP", "NO_NORMALIZATION",
]


def _name(model) -> str:
    return type(model).__name__


# the facts, as the seed toolkit named them: each answered by the model's ModelFacts

def image_encoder_size(model: nn.Module) -> int:
    """Channel width of what the vision encoder outputs (last_hidden_state's feature dim).

    For a whole CLIP/SigLIP model it is the vision tower's width.
    """
    return model_facts(model).hidden_size


hidden_size = image_encoder_size


def patch_size(model: nn.Module) -> int | None:
    """Side in pixels of the square patch that becomes one token; None for CNNs."""
    return model_facts(model).patch_size


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches in last_hidden_state (CLS, distillation, registers)."""
    return model_facts(model).num_prefix


def image_mean_std(model_or_path) -> MeanStd:
    """(mean, std) per channel that the model's images are normalized with.

    From the preprocessor_config.json saved with the model (a local directory, given or
    recorded as the model's name_or_path, or a hub id already in the HF cache); otherwise
    the family's default (its spec's `mean_std_of(tower)` or `mean_std`).
    """
    if isinstance(model_or_path, nn.Module):
        return model_facts(model_or_path).mean_std
    return mean_std_of(model_or_path)


# pooling

def pool_hidden_dim(tensor: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Mean over every dim except batch (0) and the feature dim -> (B, hidden_size).

    The feature dim is the one of size hidden_size: tokens (B, L, D) -> (B, D), a CNN's
    feature map (B, C, h, w) -> (B, C). When several dims match, HF's layouts decide
    (last for 3-D tokens, 1 for 4-D NCHW maps).
    """
    dims = [d for d in range(1, tensor.ndim) if tensor.shape[d] == hidden_size]
    conventional = {3: tensor.ndim - 1, 4: 1}.get(tensor.ndim)
    if conventional in dims:
        feature = conventional
    elif len(dims) == 1:
        feature = dims[0]
    elif not dims:
        raise ValueError(f"pool_hidden_dim: no dim of {tuple(tensor.shape)} (after batch) has "
                         f"size hidden_size={hidden_size}")
    else:
        raise ValueError(f"pool_hidden_dim: dims {dims} of {tuple(tensor.shape)} all have size "
                         f"{hidden_size}; cannot tell which is the feature dim")
    others = [d for d in range(1, tensor.ndim) if d != feature]
    return tensor.mean(dim=others) if others else tensor
