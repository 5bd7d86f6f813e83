"""SigLIP2 (NaFlex): a Linear patch embedding over channel-last patches, positions resized per
image from `spatial_shapes`; otherwise SigLIP's layers, norm and pooling head.

Its forward takes pre-cut patches, a pixel_attention_mask and spatial_shapes instead of an
image (`inputs`), and images of one patch count may share a batch whatever their shape.
"""

from __future__ import annotations

import dataclasses

import torch

from mixres.families import Embedded, FamilySpec, register_family, vision_config
from mixres.families.common import cfg_patch, patch_call, project
from mixres.families.siglip import RECIPE as SIGLIP
from mixres.families.spec import IMAGENET_STANDARD
from mixres.packing import resample_table


def naflex_patches(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C): SigLIP2's patch layout, channels last in each patch.

    Matches `convert_image_to_patches` of HF's Siglip2 image processor; the order differs
    from `mixres.packing.patchify` (C, p, p), because SigLIP2 embeds with a Linear, not a Conv.
    """
    b, c, H, W = pixel_values.shape
    if H % patch or W % patch:
        raise ValueError(f"SigLIP2 input {H}x{W} is not a multiple of its patch size {patch}")
    x = pixel_values.reshape(b, c, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (H // patch) * (W // patch), patch * patch * c)


def inputs(tower, pixel_values: torch.Tensor) -> dict:
    # an image alone has no padding, so its mask is all ones
    p = cfg_patch(vision_config(tower))
    b, _, H, W = pixel_values.shape
    patches = naflex_patches(pixel_values, p)
    dev = pixel_values.device
    return {"pixel_values": patches,
            "pixel_attention_mask": torch.ones(patches.shape[:2], dtype=torch.long, device=dev),
            "spatial_shapes": torch.tensor([[H // p, W // p]] * b, dtype=torch.long, device=dev)}


def call_list(tower, images: list[torch.Tensor], **kw):
    """Images of equal patch count but different shapes in one batch: positions are resized
    per image from `spatial_shapes`, so they need no padding to share it."""
    from mixres.families import forward_kwargs

    parts = [forward_kwargs(tower, img[None]) for img in images]
    patches, mask, shapes = (torch.cat([part[k] for part in parts])
                             for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes"))
    return tower(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes, **kw)


def embed(tower, packed, cache) -> Embedded:
    emb = tower.embeddings
    lin = emb.patch_embedding
    p, c = packed.patch_size, packed.channels
    # NaFlex patches are channel-last (ph, pw, c); ours are channel-major (c, ph, pw)
    w = lin.weight.reshape(-1, p, p, c).permute(0, 3, 1, 2)
    x = project(packed.patches.to(w.dtype), w, lin.bias)
    table = emb.position_embedding.weight
    # Siglip2VisionEmbeddings.resize_positional_embeddings for one image (no padding); as HF,
    # antialias needs float32 on the CPU, and the native grid is resized too
    pos = cache.per_grid(table, "siglip2", packed, lambda g: resample_table(
        table, g, mode="bilinear", antialias=True, fp32=table.device.type == "cpu", keep_native=False))
    return Embedded(x + pos, packed.cu_seqlens)


def _key(cfg, chw):
    p = cfg_patch(cfg)
    return chw[0], (chw[1] // p) * (chw[2] // p)


SPEC = register_family(FamilySpec(
    "siglip2", IMAGENET_STANDARD, inputs=inputs,
    call=patch_call(call_list=call_list, whole_patches=True, key=_key),
    recipe=dataclasses.replace(SIGLIP, embed=embed)))
