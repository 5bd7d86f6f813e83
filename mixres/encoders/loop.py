"""Backend "loop", the per-image reference: the unmodified model called on each image alone.

This is what the contract compares against, and the slowest honest baseline. Each image
goes through the vision tower's own forward by the family's whole-model call
(`FamilySpec.call`: interpolate_pos_encoding=True where the forward takes it; SigLIP2 gets
its NaFlex inputs for that image alone). Outputs come back as the same PackedFeatures the
other backends return; select_layer via output_hidden_states (HF's
hidden_states[select_layer]; -1 is last_hidden_state). It imports no other backend.
"""

from __future__ import annotations

import torch

from mixres import families
from mixres.encoders import register_encoder_backend
from mixres.encoders.base import Encoder, resolve_layer
from mixres.families import Call
from mixres.packing import PackedFeatures, PackedImages, seqlens_to_cu

__all__ = ["LoopEncoder"]


@register_encoder_backend("loop")
class LoopEncoder(Encoder):
    """One forward of the unmodified model per image."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.tower = families.vision_tower(self.model)
        spec = families.spec_of(self.tower)
        self.call = spec.call.call if spec is not None else Call().call
        # fail early on a bad select_layer
        resolve_layer(self.select_layer, families.vision_config(self.model).num_hidden_layers)

    def forward(self, packed: PackedImages) -> PackedFeatures:
        want_hidden = self.select_layer != -1
        tokens, pooled, num_prefix = [], [], 0
        for image, (h, w) in zip(packed.unpack(), packed.grid_hw.tolist()):
            out = self.call(self.tower, image[None], output_hidden_states=want_hidden)
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
