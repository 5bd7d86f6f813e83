"""Running the whole, unmodified model on images: what the "grouped" and "loop" backends share.

The family's `Call` (`mixres.families.spec.Call`) says how to crop, call and read back a
family; these helpers apply it. No backend is imported here.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import nn

from mixres import families
from mixres.families import Call, vision_tower

__all__ = ["call_for", "tower_config", "crop_for", "output_tokens", "params_of", "grad_or_inference"]


def call_for(model: nn.Module) -> Call:
    """The family's whole-model call; a plain pixel call for families mixres has no file for."""
    spec = families.spec_of(model)
    call = spec.call if spec is not None else Call()
    return call if call.call is not None else replace(call, call=families.call_pixels)


def tower_config(tower: nn.Module):
    """What the family's `Call` callables read: the tower's HF config, or the tower itself for a
    non-HF model (timm, open_clip, vit-pytorch's NaViT), whose facts live on the module."""
    config = getattr(tower, "config", None)
    return tower if config is None else config


def _family_name(model: nn.Module) -> str:
    try:
        return families.family(model)
    except families.UnknownImageEncoderError:
        return type(model).__name__


def params_of(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def grad_or_inference():
    # keep autograd when the caller asked for it (fine-tuning through the encoder)
    return nullcontext() if torch.is_grad_enabled() else torch.inference_mode()


def crop_for(model: nn.Module, image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """`image` (C, H, W) cropped as its family needs (floor multiple of the patch, or as is)."""
    tower = vision_tower(model)
    fc = call_for(tower)
    if image.ndim != 3:
        raise ValueError(f"{what}: expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
    _, H, W = image.shape
    cfg = tower_config(tower)
    low = fc.min_size(cfg)
    if H < low or W < low:
        raise ValueError(f"{what}: size {H}x{W} is smaller than one {low}x{low} patch of "
                         f"{_family_name(tower)}; the model cannot encode it "
                         f"alone either (pad or resize it first)")
    p = fc.crop(cfg)
    return image[:, :H // p * p, :W // p * p] if p else image


def output_tokens(hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """A batch's hidden state as (B, n, D) tokens, plus the grid when it is a feature map.

    CNN feature maps (B, C, h, w) are flattened row-major to (B, h*w, C).
    """
    if hidden.ndim == 4:
        return hidden.flatten(2).transpose(1, 2), (hidden.shape[2], hidden.shape[3])
    if hidden.ndim == 3:
        return hidden, None
    raise ValueError(f"expected a (B, n, D) sequence or a (B, C, h, w) feature map from the "
                     f"model, got shape {tuple(hidden.shape)}")
