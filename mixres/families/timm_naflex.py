"""timm `NaFlexVit`, packed: the same weights without timm's padded sequence buckets.

timm runs mixed sizes by padding every image's patches to a bucket length with a
`patch_valid` mask; here every image is its own varlen segment, nothing is padded. Matched:
the model on one image as a (1, C, H, W) tensor, `forward_features` and
`forward_head(pre_logits=True)`.

- patches: linear (the patch flattened in the model's layout, (ph, pw, C) by default, through
  `norm_input` and `proj`) or conv `proj`, then `embeds.norm`;
- positions: the embeds' own `_apply_learned_pos_embed` / `_apply_factorized_pos_embed` for each
  image's grid (added to zeros, so the codes are exactly timm's), cached per grid; prefix tokens
  (class, registers) get none;
- RoPE: the model's `rope.get_embed(shape=grid)` per image (as EVA, `timm_eva`);
- pooling: `attn_pool` (without the prefix unless `pool_include_prefix`) or global pooling,
  then `fc_norm` and `head_drop`.
Variable patch sizes (the patch interpolator) and `dynamic_img_pad` are not packed.
"""

from __future__ import annotations

import torch

from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.common import conv_patches
from mixres.families.spec import IMAGENET_DEFAULT
from mixres.families.timm_blocks import run_blocks
from mixres.families.timm_eva import rope_kwargs
from mixres.families.timm_vit import head_pool, layers, patch_side, prefix_rows, timm_mean_std, whole_call
from mixres.packing import interleave_prefix

__all__ = ["SPEC", "RECIPE"]


def _patches(emb, packed) -> torch.Tensor:
    if not emb.is_linear:
        return conv_patches(packed, emb.proj)
    p, c = packed.patch_size, packed.channels
    x = packed.patches.to(emb.proj.weight.dtype)
    if emb.channels_last:  # ours are (c, ph, pw); NaFlex's default flat layout is (ph, pw, c)
        x = x.reshape(-1, c, p, p).permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    if emb.norm_input is not None:
        x = emb.norm_input(x)
    return emb.proj(x)


def _grid_pos(emb, grid, dim: int, like: torch.Tensor) -> torch.Tensor:
    """(h*w, D) position codes of `grid`: the embeds' own method added to zeros."""
    x = like.new_zeros(1, grid[0] * grid[1], dim)
    if emb.pos_embed_type == "learned":
        emb._apply_learned_pos_embed(x, grid_size=list(grid))
    else:
        emb._apply_factorized_pos_embed(x, grid_size=list(grid))
    return x[0]


def embed(tower, packed, cache) -> Embedded:
    emb = tower.embeds
    if tower.training and tower.patch_drop is not None:
        raise ValueError("packed backend: timm patch dropout (training) drops tokens per image at "
                         "random; call model.eval() or use backend='grouped'")
    if emb.dynamic_img_pad:
        raise ValueError("packed backend: NaFlexVit with dynamic_img_pad pads partial patches; "
                         "use backend='grouped'")
    x = emb.norm(_patches(emb, packed))
    dim = x.shape[-1]
    if emb.pos_embed_type in ("learned", "factorized"):
        table = emb.pos_embed if emb.pos_embed is not None else emb.pos_embed_y
        x = x + cache.per_grid(table, f"naflex-{emb.pos_embed_type}-{x.dtype}", packed,
                               lambda g: _grid_pos(emb, g, dim, x))
    rows = prefix_rows(emb, dim)
    prefix = torch.cat(rows) if rows else x.new_zeros(0, dim)
    hidden, cu = interleave_prefix(prefix, x, packed.cu_seqlens)
    kwargs = rope_kwargs(tower.rope, tower.rope_is_mixed, packed, cache, tower.num_prefix_tokens)
    return Embedded(tower.norm_pre(emb.pos_drop(hidden)), cu, kwargs)


def pool(tower, tokens, cu):
    """forward_head(pre_logits=True): NaFlexVit._pool, fc_norm, head_drop."""
    return head_pool(tower, tokens, cu, int(tower.num_prefix_tokens))


def _patch_size(tower) -> int:
    return patch_side(tower.embeds.patch_size)


RECIPE = Recipe(embed=embed, layers=layers, final_norm=lambda t: t.norm, pool=pool, run=run_blocks)

SPEC = register_family(FamilySpec(
    "timm_naflex", IMAGENET_DEFAULT, prefix_tokens=lambda tower: int(tower.num_prefix_tokens),
    classes=("timm.models.naflexvit.NaFlexVit",),
    tower=lambda model: model,
    patch_size=_patch_size,
    hidden_size=lambda tower: int(tower.embed_dim),
    mean_std_of=timm_mean_std,
    call=whole_call(_patch_size),
    recipe=RECIPE))
