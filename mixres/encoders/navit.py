"""Backend "navit": vit-pytorch's NaViT (or mixres' `NaViTModel`) run packed.

It is the packed backend on the NaViT family's `Recipe` (`mixres.families.navit`, with its
own layer runner, as timm's), plus PIL/path inputs shrunk to fit the position tables:

    tokens  each image's patch tokens after the transformer's final norm (no prefix tokens)
    pooled  the attention-pooled latent after `to_latent`, before `mlp_head`, so
            `navit.mlp_head(feats.pooled)` are the model's logits
"""

from __future__ import annotations

from torch import nn

from mixres.encoders import register_encoder_backend
from mixres.encoders.packed import PackedEncoder
from mixres.families.navit import unwrap_navit

__all__ = ["NaViTEncoder"]


# the backend

@register_encoder_backend("navit")
class NaViTEncoder(PackedEncoder):
    """Packed NaViT encoder: `load_encoder(navit_or_NaViTModel, backend="navit")`.

    Its facts come from the NaViT family spec (`mixres.families.navit`): the model's patch
    size, no prefix tokens, and no pixel normalization of its own, so images given as
    PIL/paths are normalized with mean = std = 0.5 per channel (pixels to [-1, 1]); tensors
    are used as given. PIL/path inputs are also shrunk (aspect kept) so their grid fits the
    model's position tables (`max_grid`).
    """

    def __init__(self, model: nn.Module, **kwargs):
        self.navit = unwrap_navit(model)  # a TypeError naming the supported classes otherwise
        super().__init__(model, **kwargs)

    @property
    def max_grid(self) -> tuple[int, int]:
        """The position tables' size in patches: PIL/path inputs are shrunk to fit it."""
        return self.navit.pos_embed_height.shape[0], self.navit.pos_embed_width.shape[0]
