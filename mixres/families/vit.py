"""ViT (HF `ViTModel`): conv patches, CLS token, bicubic-interpolated learned positions."""

from __future__ import annotations

import torch

from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.common import conv_patches, patch_call
from mixres.families.spec import IMAGENET_STANDARD, cls_only
from mixres.packing import interleave_prefix, resample_table


def prefix_tokens(emb) -> list[torch.Tensor]:
    """CLS, then DeiT's distillation token where the embeddings have one."""
    tokens = [emb.cls_token.reshape(1, -1)]
    if getattr(emb, "distillation_token", None) is not None:
        tokens.append(emb.distillation_token.reshape(1, -1))
    return tokens


def embed(tower, packed, cache) -> Embedded:
    emb = tower.embeddings
    x = conv_patches(packed, emb.patch_embeddings.projection)
    table = emb.position_embeddings[0]
    prefix = prefix_tokens(emb)
    p = len(prefix)
    pos = cache.per_grid(table, "vit", packed, lambda g: resample_table(table[p:], g))
    hidden, cu = interleave_prefix(torch.cat(prefix) + table[:p], x + pos, packed.cu_seqlens)
    return Embedded(emb.dropout(hidden), cu)


def pool(tower, tokens, cu):
    if getattr(tower, "pooler", None) is None:
        return None
    return tower.pooler(tokens[cu[:-1].long()][:, None])  # HF's pooler reads hidden[:, 0]


RECIPE = Recipe(embed=embed, layers=lambda t: t.layers, final_norm=lambda t: t.layernorm, pool=pool)

SPEC = register_family(FamilySpec("vit", IMAGENET_STANDARD, prefix_tokens=cls_only, call=patch_call(),
                                  recipe=RECIPE))
