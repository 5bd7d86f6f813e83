"""CLIP: bias-free conv, class embedding, pre-layernorm; last_hidden_state has no final norm."""

from __future__ import annotations

from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.common import conv_patches, patch_call
from mixres.families.spec import OPENAI_CLIP, cls_only
from mixres.packing import interleave_prefix, resample_table


def embed(tower, packed, cache) -> Embedded:
    emb = tower.embeddings
    x = conv_patches(packed, emb.patch_embedding)
    table = emb.position_embedding.weight
    prefix = emb.class_embedding.reshape(1, -1) + table[:1]
    pos = cache.per_grid(table, "clip", packed, lambda g: resample_table(table[1:], g))
    hidden, cu = interleave_prefix(prefix, x + pos, packed.cu_seqlens)
    return Embedded(tower.pre_layrnorm(hidden), cu)


RECIPE = Recipe(embed=embed, layers=lambda t: t.encoder.layers,
                pool=lambda t, tok, cu: t.post_layernorm(tok[cu[:-1].long()]))

SPEC = register_family(FamilySpec("clip", OPENAI_CLIP, prefix_tokens=cls_only, call=patch_call(),
                                  recipe=RECIPE))
