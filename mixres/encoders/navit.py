"""Backend "navit": vit-pytorch's NaViT (or mixres' `NaViTModel`) run packed.

The packed forward is the NaViT family's (`mixres.families.navit.packed_forward`):

    tokens  each image's patch tokens after the transformer's final norm (no prefix tokens)
    pooled  the attention-pooled latent after `to_latent`, before `mlp_head`, so
            `navit.mlp_head(feats.pooled)` are the model's logits
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixres.encoders import register_encoder_backend
from mixres.encoders.base import Encoder
from mixres.families.navit import packed_forward, unwrap_navit
from mixres.packing import PackedFeatures, PackedImages

__all__ = ["NaViTEncoder"]


# the backend

@register_encoder_backend("navit")
class NaViTEncoder(Encoder):
    """Packed NaViT encoder: `load_encoder(navit_or_NaViTModel, backend="navit")`.

    NaViT defines no pixel normalization; images given as PIL/paths are normalized with
    mean = std = (0.5, 0.5, 0.5) (pixels to [-1, 1]), tensors are used as given.
    The patch size is the model's; there are no prefix tokens (num_prefix 0). PIL/path
    inputs are also shrunk (aspect kept) so their grid fits the model's position tables.
    """

    cpu_chunk_tokens = 2048  # see Encoder: cache-sized GEMMs on the CPU

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self.navit = unwrap_navit(model)  # a TypeError naming the supported classes otherwise

    @property
    def patch_size(self) -> int:
        return self.navit.patch_size

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        c = self.navit.channels
        return (0.5,) * c, (0.5,) * c

    @property
    def num_prefix(self) -> int:
        return 0

    def prepare(self, images) -> list[torch.Tensor]:
        from mixres.images import load_image

        if isinstance(images, (str, Path, torch.Tensor)) or hasattr(images, "mode"):
            images = [images]
        return [img if isinstance(img, torch.Tensor) else self._fit(load_image(img)) for img in images]

    def _fit(self, img) -> torch.Tensor:
        """A PIL image -> normalized tensor whose grid fits the position tables (max_h x max_w)."""
        from mixres.images import preprocess

        max_h, max_w = self.navit.pos_embed_height.shape[0], self.navit.pos_embed_width.shape[0]
        ratio = img.width / img.height
        # the most tokens a grid of this aspect can have: h = sqrt(t/r) <= max_h, w = sqrt(t*r) <= max_w;
        # past the point where one side clamps to a single patch, (1, t) or (t, 1) fits while t <= max
        cap = max(1, int(min(max_h ** 2 * ratio, max_w ** 2 / ratio)),
                  min(max_w, int(ratio)), min(max_h, int(1 / ratio)))
        max_image_tokens = cap if self.max_image_tokens is None else min(self.max_image_tokens, cap)
        mean, std = self.mean_std
        return preprocess(img, self.patch_size, min_image_tokens=min(self.min_image_tokens, max_image_tokens),
                          max_image_tokens=max_image_tokens, mean=mean, std=std)

    def forward(self, packed: PackedImages) -> PackedFeatures:
        tokens, pooled = packed_forward(self.navit, packed, self.select_layer)
        return PackedFeatures(tokens, packed.cu_seqlens, packed.grid_hw, 0, pooled)
