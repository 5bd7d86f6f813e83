"""Backend "grouped": any vision model run whole on batches of images that share a shape.

Grouping images by exact shape is exact by construction: every forward sees a batch of
identical-shape images, which is what the model sees for each image alone. It works for
every family, ViT or CNN (ConvNeXt, ResNet, MobileViT, Swin, ...); what differs per family
(cropping, how to call, which images may share a batch, token grid) is its spec's `Call`.

Sizes. Patch-embedding models drop the pixels past the last whole patch (their stride-p
conv ignores them), so images are cropped to the floor multiple of the patch first: same
result, and more images share a shape. An image smaller than one patch makes the unmodified
model fail on it alone; here it raises a ValueError naming the image. Swin pads internally
and CNNs use every pixel: their images keep their exact size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mixres import families
from mixres.encoders import register_encoder_backend
from mixres.encoders.base import Encoder
from mixres.encoders.whole import (
    _family_name,
    call_for,
    crop_for,
    output_tokens,
    params_of,
    tower_config,
)
from mixres.families import vision_tower
from mixres.packing import PackedFeatures, PackedImages, seqlens_to_cu

__all__ = ["GroupedEncoder", "call_for", "crop_for", "run_grouped", "output_tokens", "probe_tokens"]


def run_grouped(model: nn.Module, images: Sequence[torch.Tensor], *,
                max_batch_pixels: int | None = None, select_layer: int = -1):
    """Run `model` on `images` (list of (C, H, W), already cropped) in same-shape batches.

    Returns, in input order, one (tokens (n, D), pooled (D',) or None, grid (h, w)) per
    image; select_layer=-k reads HF's hidden_states[-k] (no final norm, no pooled). A
    batch holds at most `max_batch_pixels` input pixels (an image larger than that runs
    alone); None puts a whole shape group in one batch.
    """
    tower = vision_tower(model)
    fc = call_for(tower)
    cfg = tower_config(tower)
    device, dtype = params_of(tower)
    if max_batch_pixels is not None and max_batch_pixels <= 0:
        raise ValueError(f"max_batch_pixels must be positive, got {max_batch_pixels}")
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(fc.key(cfg, tuple(img.shape)), []).append(i)
    kw = {"output_hidden_states": True} if select_layer != -1 else {}
    results: list = [None] * len(images)
    for idx in groups.values():
        pixels = images[idx[0]].shape[-2] * images[idx[0]].shape[-1]
        per = len(idx) if max_batch_pixels is None else max(1, max_batch_pixels // max(pixels, 1))
        for s in range(0, len(idx), per):
            chunk = idx[s:s + per]
            batch = [images[i].to(device=device, dtype=dtype) for i in chunk]
            if len({tuple(b.shape) for b in batch}) == 1:
                out = fc.call(tower, torch.stack(batch), **kw)
            else:  # same key, different shapes: only families with call_list group like that
                out = fc.call_list(tower, batch, **kw)
            hidden = out.last_hidden_state if select_layer == -1 else out.hidden_states[select_layer]
            tokens, fmap_grid = output_tokens(hidden)
            # the pooler reads the last layer: it belongs to select_layer=-1 only (as in "packed")
            pooled = getattr(out, "pooler_output", None) if select_layer == -1 else None
            pooled = pooled.flatten(1) if pooled is not None else None
            for j, i in enumerate(chunk):
                _, H, W = images[i].shape
                if fmap_grid is not None:
                    grid = fmap_grid
                elif fc.grid is not None:
                    grid = fc.grid(cfg, H, W)
                else:  # unknown family with a sequence output: one row of tokens
                    grid = (1, tokens.shape[1])
                results[i] = (tokens[j], None if pooled is None else pooled[j], tuple(grid))
    return results


def probe_tokens(model: nn.Module, select_layer: int = -1) -> torch.Tensor:
    """Tokens of a blank 64x64 image (only to learn the width D when every slot is empty)."""
    channels = int(getattr(getattr(vision_tower(model), "config", None), "num_channels", 3))
    with torch.inference_mode():
        return run_grouped(model, [torch.zeros(channels, 64, 64)], select_layer=select_layer)[0][0]


@register_encoder_backend("grouped")
class GroupedEncoder(Encoder):
    """Shape-grouped execution of any HF vision model, as a `load_encoder` backend.

    Exact for every family (each forward is a batch of identical-shape images).
    `max_batch_tokens` bounds a forward at max_batch_tokens * stride^2 input pixels,
    where stride is the patch size, or a CNN's output stride (pixels per output token
    along a side). Tensors are cropped like the model itself would (see the module
    docstring); PIL images and paths are resized to multiples of the stride.

    PackedFeatures: tokens are each image's last hidden state (a CNN's feature map as
    (h*w, C)), grid_hw the output token grid (a CNN's feature-map grid), num_prefix
    the family's prefix tokens (0 for CNNs), pooled the flattened `pooler_output` or None.
    """

    @property
    def _tower(self) -> nn.Module:
        return vision_tower(self.model)

    @property
    def _config(self):
        return tower_config(self._tower)

    @property
    def patch_size(self) -> int | None:
        """The patch size of patch-embedding families, None for CNNs and windowed models."""
        return call_for(self._tower).crop(self._config)

    @property
    def stride(self) -> int | None:
        """Input pixels per output token along a side (None when the family is unknown)."""
        return call_for(self._tower).stride(self._config)

    @property
    def num_prefix(self) -> int:
        try:
            return families.num_prefix_tokens(self.model)
        except families.UnknownImageEncoderError:  # a family mixres has no file for
            return 0

    @property
    def grid_unit(self) -> int:
        # the resize policy of the base class, on the model's output stride (CNNs have no patch)
        if self.stride is None:
            raise ValueError(f"backend 'grouped': no resize policy for family "
                             f"{_family_name(self.model)!r} (unknown output stride); pass normalized "
                             f"(C, H, W) tensors instead of PIL images or paths")
        return self.stride

    def run(self, images) -> PackedFeatures:
        """The images (a list, or PackedImages) cropped as the family needs, run whole per shape."""
        imgs = images.unpack() if isinstance(images, PackedImages) else images
        imgs = [crop_for(self.model, img, f"image {i}") for i, img in enumerate(imgs)]
        budget = None
        if self.max_batch_tokens is not None:
            budget = self.max_batch_tokens * (self.stride or 1) ** 2
        with self.cpu_kernels(self.device):
            return self._features(run_grouped(self.model, imgs, max_batch_pixels=budget,
                                              select_layer=self.select_layer))

    def forward(self, packed: PackedImages) -> PackedFeatures:
        with self.cpu_kernels(packed.patches.device):
            return self._features(run_grouped(self.model, packed.unpack(), select_layer=self.select_layer))

    def _features(self, results) -> PackedFeatures:
        tokens = [t for t, _, _ in results]
        pooled = [p for _, p, _ in results]
        device = tokens[0].device
        return PackedFeatures(
            torch.cat(tokens), seqlens_to_cu([t.shape[0] for t in tokens], device=device),
            torch.tensor([g for _, _, g in results], dtype=torch.long, device=device),
            self.num_prefix, None if pooled[0] is None else torch.stack(pooled))
