"""The per-image reference: the unmodified HF vision model called on each image alone.

This is what the contract compares against, and the slowest honest baseline. Each image
goes through the vision tower's own forward (interpolate_pos_encoding=True where the
forward takes it); SigLIP2 gets its own NaFlex inputs for that image alone (channel-last
patches (1, N, p*p*C), an all-ones pixel_attention_mask, spatial_shapes). Outputs come
back as the same PackedFeatures the packed backend returns, select_layer via
output_hidden_states (HF's hidden_states[select_layer]; -1 is last_hidden_state).
"""

from __future__ import annotations

import inspect

import torch

from mixres.encoders import register_backend
from mixres.encoders.base import Encoder
from mixres.encoders.packed import resolve_layer, vision_tower
from mixres.packing import PackedFeatures, PackedImages, seqlens_to_cu

__all__ = ["LoopEncoder", "naflex_inputs"]


def naflex_inputs(image: torch.Tensor, patch_size: int) -> dict:
    """SigLIP2 NaFlex inputs of one (C, H, W) image, with no padding."""
    c, H, W = image.shape
    p = patch_size
    h, w = H // p, W // p
    patches = image.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(1, h * w, p * p * c)
    return {"pixel_values": patches,
            "pixel_attention_mask": torch.ones(1, h * w, dtype=torch.long, device=image.device),
            "spatial_shapes": torch.tensor([[h, w]], device=image.device)}


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


@register_backend("loop")
class LoopEncoder(Encoder):
    """One forward of the unmodified model per image."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.tower = vision_tower(self.model)
        layers = self.tower.config.num_hidden_layers
        resolve_layer(self.select_layer, layers)  # fail early

    @property
    def patch_size(self) -> int:
        p = self.tower.config.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    def _inputs(self, image: torch.Tensor) -> dict:
        if _accepts(self.tower.forward, "spatial_shapes"):
            return naflex_inputs(image, self.patch_size)
        kw = {"pixel_values": image[None]}
        if _accepts(self.tower.forward, "interpolate_pos_encoding"):
            kw["interpolate_pos_encoding"] = True
        return kw

    def forward(self, packed: PackedImages) -> PackedFeatures:
        want_hidden = self.select_layer != -1
        tokens, pooled, num_prefix = [], [], 0
        for image, (h, w) in zip(packed.unpack(), packed.grid_hw.tolist()):
            out = self.tower(**self._inputs(image), output_hidden_states=want_hidden)
            if want_hidden:
                t = out.hidden_states[resolve_layer(self.select_layer, len(out.hidden_states) - 1)][0]
            else:
                t = out.last_hidden_state[0]
                pooled.append(getattr(out, "pooler_output", None))
            num_prefix = t.shape[0] - h * w
            tokens.append(t)
        has_pooled = bool(pooled) and all(p is not None for p in pooled)
        return PackedFeatures(torch.cat(tokens),
                              seqlens_to_cu([t.shape[0] for t in tokens], device=tokens[0].device),
                              packed.grid_hw, num_prefix,
                              torch.cat(pooled) if has_pooled else None)
