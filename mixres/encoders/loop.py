"""Backend "loop", the per-image reference: the unmodified model called on each image alone.

This is what the contract compares against (`check_invariance`'s default reference), and
the slowest honest baseline. It runs every model the other backends run: ViT-family,
windowed (Swin), convolutional (ResNet, ConvNeXt, MobileViT), NaViT (vit-pytorch's own
forward). Each image goes through the vision tower's own forward by the family's whole-model
call (`FamilySpec.call`: interpolate_pos_encoding=True where the forward takes it; SigLIP2
gets its NaFlex inputs for that image alone), cropped only as the family says (the floor
multiple of the patch, which a patch embedding drops anyway). Outputs come back as the
same PackedFeatures the other backends return: a CNN's feature map as (h*w, C) tokens on
its grid. select_layer via output_hidden_states (HF's hidden_states[select_layer]; -1 is
last_hidden_state). It imports no other backend.
"""

from __future__ import annotations

import torch

from mixres import families
from mixres.encoders import register_encoder_backend
from mixres.encoders.base import Encoder
from mixres.encoders.whole import call_for, crop_for, output_tokens, tower_config
from mixres.packing import PackedFeatures, PackedImages, seqlens_to_cu

__all__ = ["LoopEncoder"]


@register_encoder_backend("loop")
class LoopEncoder(Encoder):
    """One forward of the unmodified model per image."""

    prepack = False  # the reference: the model's own kernels too (no `mixres.prepacked`)

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.tower = families.vision_tower(self.model)
        self.fc = call_for(self.tower)
        self.config = tower_config(self.tower)

    @property
    def grid_unit(self) -> int:
        # PIL images and paths are resized to multiples of the output stride (CNNs have no patch)
        stride = self.fc.stride(self.config) if self.config is not None else None
        unit = stride or self.patch_size
        if unit is None:
            raise ValueError(f"backend 'loop': no resize policy for {type(self.tower).__name__} "
                             f"(unknown output stride); pass normalized (C, H, W) tensors")
        return unit

    def run(self, images) -> PackedFeatures:
        """Each image (a list, or PackedImages) cropped as its family needs, run alone."""
        imgs = images.unpack() if isinstance(images, PackedImages) else images
        return self.run_images([crop_for(self.model, img, f"image {i}") for i, img in enumerate(imgs)])

    def forward(self, packed: PackedImages) -> PackedFeatures:
        return self.run_images(packed.unpack())

    def run_images(self, images: list[torch.Tensor]) -> PackedFeatures:
        """The model on each (C, H, W) image alone (already cropped), as PackedFeatures."""
        return self._features([self._one(img) for img in images])

    def _one(self, image: torch.Tensor):
        """(tokens (n, D), pooled (D',) or None, grid (h, w)) of one (C, H, W) image alone."""
        last = self.select_layer == -1
        out = self.fc.call(self.tower, image[None].to(self.device, self.dtype), output_hidden_states=not last)
        if last:
            hidden = out.last_hidden_state
        else:  # Swin's hidden_states are sequences on each stage's own grid: read them as maps
            states = getattr(out, "reshaped_hidden_states", None) or out.hidden_states
            hidden = states[self.select_layer]
        tokens, fmap_grid = output_tokens(hidden)
        pooled = getattr(out, "pooler_output", None) if last else None
        _, H, W = image.shape
        if fmap_grid is not None:
            grid = fmap_grid
        elif self.fc.grid is not None and self.config is not None:
            grid = self.fc.grid(self.config, H, W)
        elif self.patch_size:
            grid = (H // self.patch_size, W // self.patch_size)
        else:  # a family mixres has no file for, with a sequence output: one row of tokens
            grid = (1, tokens.shape[1])
        return tokens[0], None if pooled is None else pooled.flatten(1)[0], tuple(grid)

    def _features(self, results) -> PackedFeatures:
        tokens = [t for t, _, _ in results]
        pooled = [p for _, p, _ in results]
        grids = [g for _, _, g in results]
        num_prefix = tokens[0].shape[0] - grids[0][0] * grids[0][1]
        device = tokens[0].device
        return PackedFeatures(torch.cat(tokens), seqlens_to_cu([t.shape[0] for t in tokens], device=device),
                              torch.tensor(grids, dtype=torch.long, device=device), num_prefix,
                              None if any(p is None for p in pooled) else torch.stack(pooled))
