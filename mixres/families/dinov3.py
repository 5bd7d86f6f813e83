"""DINOv3 ViT: CLS + registers, no absolute position codes; 2-D RoPE on patch tokens only."""

from __future__ import annotations

import math

import torch
from torch import nn

from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.common import conv_patches, first_token, patch_call
from mixres.families.dinov2 import cls_and_registers
from mixres.families.spec import IMAGENET_DEFAULT
from mixres.packing import interleave_prefix, tensor_stamp


def patch_centers(h: int, w: int, device) -> torch.Tensor:
    """(h*w, 2) patch centers (y, x) in [-1, 1] of an h x w grid, float32 (HF's
    get_patches_center_coordinates: each image's own grid, whatever its size)."""
    ys = torch.arange(0.5, h, dtype=torch.float32, device=device) / h
    xs = torch.arange(0.5, w, dtype=torch.float32, device=device) / w
    return 2.0 * torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1) - 1.0


def _rope_augmentation(rope: nn.Module) -> dict | None:
    """HF's training-time coordinate augmentation (shift / jitter / rescale), None in eval."""
    cfg = rope.config
    aug = {"shift": cfg.pos_embed_shift, "jitter": cfg.pos_embed_jitter, "rescale": cfg.pos_embed_rescale}
    return aug if rope.training and any(v is not None for v in aug.values()) else None


def _rope(rope: nn.Module, grid: tuple[int, int], dtype: torch.dtype, augment: dict | None,
          device) -> torch.Tensor:
    """(h*w, 2*head_dim) [cos | sin] of one image, as DINOv3ViTRopePositionEmbedding computes
    them for that image alone: float32 angles from the (possibly low-precision) inv_freq
    buffer, autocast off (transformers 5.17 forces that), cast to the patch weights' dtype."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        coords = patch_centers(*grid, device)
        if augment is not None:  # one random draw per image, as each image alone would get
            from transformers.models.dinov3_vit import modeling_dinov3_vit as hf
            coords = hf.augment_patches_center_coordinates(coords, **augment)
        angles = 2 * math.pi * coords[:, :, None] * rope.inv_freq[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.cat([torch.cos(angles), torch.sin(angles)], -1).to(dtype)


def embed(tower, packed, cache) -> Embedded:
    """Prefix tokens (CLS, then registers) get no position code and, in HF, no rotation:
    its apply_rotary_pos_emb rotates the LAST cos.shape[-2] tokens of the sequence and
    leaves the first (seq_len - that) alone. In a packed sequence the prefixes sit inside,
    so cos/sin are built full-length, with identity rows (cos 1, sin 0) at every prefix
    position: q * 1 + rotate_half(q) * 0 == q exactly, and every token goes through the
    same formula."""
    emb = tower.embeddings
    conv = emb.patch_embeddings
    x = conv_patches(packed, conv)
    prefix = torch.cat([emb.cls_token.reshape(1, -1), emb.register_tokens.reshape(-1, x.shape[-1])])
    hidden, cu = interleave_prefix(prefix, x, packed.cu_seqlens)

    rope, dtype = tower.rope_embeddings, conv.weight.dtype
    augment = _rope_augmentation(rope)
    grids = [tuple(g) for g in packed.grid_hw.tolist()]
    if augment is None:  # eval: deterministic per (grid, dtype, device), cached
        stamp = tensor_stamp(rope.inv_freq)
        rows = [cache.get(rope.inv_freq, f"dinov3-rope-{dtype}", g,
                          lambda g=g: _rope(rope, g, dtype, None, x.device), stamp) for g in grids]
    else:
        rows = [_rope(rope, g, dtype, augment, x.device) for g in grids]
    head_dim = rows[0].shape[-1] // 2
    n = prefix.shape[0]
    identity = torch.cat([x.new_ones(n, head_dim), x.new_zeros(n, head_dim)], -1)
    cos_sin, _ = interleave_prefix(identity.to(dtype), torch.cat(rows), packed.cu_seqlens)
    cos, sin = cos_sin.split(head_dim, -1)
    return Embedded(hidden, cu, {"position_embeddings": (cos, sin)})


RECIPE = Recipe(embed=embed, layers=lambda t: t.model.layer, final_norm=lambda t: t.norm,
                pool=first_token)  # pooler_output: the normed CLS

SPEC = register_family(FamilySpec("dinov3_vit", IMAGENET_DEFAULT, prefix_tokens=cls_and_registers,
                                  call=patch_call(), recipe=RECIPE))
