"""timm `Eva` (EVA, EVA-02 and its RoPE variants), packed.

Matched: `forward_features` with `dynamic_img_size=True` and `forward_head(pre_logits=True)`.
Embedding as timm's ViT (class token, registers, `no_embed_class`, `pos_embed` resampled per
grid by timm's `resample_abs_pos_embed`), then `norm_pre`. RoPE: the model's own
`rope.get_embed(shape=grid)` for each image's grid (cached per grid in eval), concatenated in
packed order with identity rows at prefix tokens (see `timm_blocks`); timm's mixed RoPE
(one table per layer and head) goes per layer. Eva's 'map' pool attends over every token,
prefix included, as timm does; 'avg' / 'max' skip the prefix.
"""

from __future__ import annotations

import torch

from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.spec import IMAGENET_DEFAULT
from mixres.families.timm_blocks import latent_pool, packed_rope, pool_tokens, run_blocks
from mixres.families.timm_vit import (
    finish_pool,
    layers,
    patch_embed_size,
    patch_tokens,
    prefix_rows,
    prefix_tokens,
    resampled_patch_pos,
    timm_mean_std,
    whole_call,
)
from mixres.packing import interleave_prefix, tensor_stamp

__all__ = ["SPEC", "RECIPE", "rope_tables", "rope_kwargs"]


def _rope_key(rope) -> torch.Tensor | None:
    """A tensor of the rope module to key the cache on (its weights' version), if it has one."""
    return next(iter([*rope.parameters(), *rope.buffers()]), None)


def rope_tables(rope, packed, cache, tag: str) -> list[torch.Tensor]:
    """Each image's rope table, rope.get_embed(shape=grid) as timm builds it for that image alone.

    Cached per grid only in eval: in training timm's coordinate augmentations draw at random."""
    grids = [tuple(g) for g in packed.grid_hw.tolist()]
    key = _rope_key(rope)
    if rope.training or key is None:
        return [rope.get_embed(shape=list(g)) for g in grids]
    stamp = tensor_stamp(key)
    return [cache.get(key, tag, g, lambda g=g: rope.get_embed(shape=list(g)), stamp) for g in grids]


def rope_kwargs(rope, mixed: bool, packed, cache, prefix: int) -> dict:
    """layer_kwargs for `timm_blocks.run_blocks`: the packed table(s), identity rows at prefixes."""
    if rope is None:
        return {}
    tables = rope_tables(rope, packed, cache, f"timm-rope-{mixed}")
    table = packed_rope(tables, prefix)
    if mixed:  # (depth, heads, N, 2d) -> per layer (N, heads, 2d)
        return {"rope_layers": table.permute(0, 2, 1, 3)}
    return {"rope": table[:, None] if table.ndim == 2 else table.transpose(-3, -2)}


def embed(tower, packed, cache) -> Embedded:
    if tower.training and tower.patch_drop is not None:
        raise ValueError("packed backend: timm patch dropout (training) drops tokens per image at "
                         "random; call model.eval() or use backend='grouped'")
    x = patch_tokens(tower, packed)
    dim = x.shape[-1]
    rows = prefix_rows(tower, dim)
    p = prefix_tokens(tower)
    prefix = torch.cat(rows) if rows else x.new_zeros(0, dim)
    table = tower.pos_embed
    if table is not None:
        with_prefix = 0 if tower.no_embed_class else p
        x = x + cache.per_grid(table, f"timm-eva{with_prefix}", packed,
                               lambda g: resampled_patch_pos(tower, table, with_prefix, g))
        if with_prefix:
            prefix = prefix + table[0, :p]
    hidden, cu = interleave_prefix(prefix, x, packed.cu_seqlens)
    kwargs = rope_kwargs(tower.rope, getattr(tower, "rope_mixed", False), packed, cache, p)
    return Embedded(tower.norm_pre(tower.pos_drop(hidden)), cu, kwargs)


def pool(tower, tokens, cu):
    """forward_head(pre_logits=True): Eva.pool (attn_pool over all tokens), fc_norm, head_drop."""
    if tower.attn_pool is not None:
        return finish_pool(tower, latent_pool(tower.attn_pool, tokens, cu))
    return finish_pool(tower, pool_tokens(tokens, cu, tower.global_pool, prefix_tokens(tower)))


RECIPE = Recipe(embed=embed, layers=layers, final_norm=lambda t: t.norm, pool=pool, run=run_blocks)

SPEC = register_family(FamilySpec(
    "timm_eva", IMAGENET_DEFAULT, prefix_tokens=prefix_tokens,
    classes=("timm.models.eva.Eva",),
    tower=lambda model: model,
    patch_size=patch_embed_size,
    hidden_size=lambda tower: int(tower.embed_dim),
    mean_std_of=timm_mean_std,
    call=whole_call(patch_embed_size),
    recipe=RECIPE))
