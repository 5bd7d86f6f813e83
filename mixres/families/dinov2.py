"""DINOv2 and DINOv2-with-registers: float32 bicubic positions (antialiased with registers),
register tokens after CLS (they get no position code)."""

from __future__ import annotations

import torch

from mixres.families import Embedded, FamilySpec, Recipe, register_family, vision_config
from mixres.families.common import conv_patches, first_token, patch_call
from mixres.families.spec import IMAGENET_DEFAULT
from mixres.packing import interleave_prefix, resample_table


def cls_and_registers(tower) -> int:
    return 1 + int(getattr(vision_config(tower), "num_register_tokens", 0) or 0)


def embed(tower, packed, cache) -> Embedded:
    emb = tower.embeddings
    x = conv_patches(packed, emb.patch_embeddings.projection)
    table = emb.position_embeddings[0]
    registers = getattr(emb, "register_tokens", None)
    antialias = registers is not None
    prefix = [emb.cls_token.reshape(1, -1) + table[:1]]
    if registers is not None:
        prefix.append(registers[0])
    pos = cache.per_grid(table, f"dinov2{antialias}", packed,
                         lambda g: resample_table(table[1:], g, fp32=True, antialias=antialias))
    hidden, cu = interleave_prefix(torch.cat(prefix), x + pos, packed.cu_seqlens)
    return Embedded(emb.dropout(hidden), cu)


RECIPE = Recipe(embed=embed, layers=lambda t: t.encoder.layer, final_norm=lambda t: t.layernorm,
                pool=first_token)

# BitImageProcessor defaults to the OpenAI CLIP statistics; the checkpoints ship ImageNet's
SPEC = register_family(FamilySpec("dinov2", IMAGENET_DEFAULT, prefix_tokens=cls_and_registers,
                                  model_types=("dinov2", "dinov2_with_registers"), call=patch_call(),
                                  recipe=RECIPE))
