"""open_clip image towers, packed: `VisionTransformer` and timm-backed `TimmModel` towers.

A whole open_clip model (CLIP, CustomTextCLIP, CoCa) is read through its `.visual` tower.

VisionTransformer. Matched: the tower's token output (`output_tokens=True`: the patch tokens
after `ln_post`, or before it with `final_ln_after_pool`) and its pooled output (`pool_type`
'tok' / 'avg', then `ln_post` where it goes after the pool, then `@ proj`). The tokens mixres
returns are the class token then the patches (prefix 1). With an attentional pooler (CoCa) the
tower's "tokens" are its pooled queries, not image tokens: mixres returns the transformer's
output (no `ln_post`) as the image's tokens and the tower's pooled output as pooled; each
image's queries attend to that image alone (one varlen query set per image).

Positions. open_clip's table is fixed-size: the native grid uses it as is; other grids get it
resampled by timm's `resample_abs_pos_embed` (bicubic, antialiased; the class row kept), i.e.
the tower with its table resampled to that grid.

TimmModel. The trunk is a timm model run by its own family file (timm_vit / timm_eva /
timm_naflex); pooled = tower.head(trunk.head(trunk's forward_head(pre_logits=True))), as
TimmModel.forward. The trunk's tokens are its `forward_features`.

mean / std: the tower's `image_mean` / `image_std` (set by open_clip's create_model from the
checkpoint's preprocess cfg), else open_clip's defaults (OpenAI CLIP's).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from mixres import families
from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.common import conv_patches
from mixres.families.spec import OPENAI_CLIP, Call
from mixres.families.timm_blocks import check_blocks, mha_pool, pool_tokens, run_blocks
from mixres.families.timm_vit import patch_side
from mixres.packing import interleave_prefix

__all__ = ["SPEC", "TIMM_TOWER_SPEC", "RECIPE", "TIMM_TOWER_RECIPE", "resample_open_clip_table"]

_TIMM_TOWER = "open_clip.timm_model.TimmModel"


def _is_timm_tower(tower) -> bool:
    return f"{type(tower).__module__}.{type(tower).__qualname__}" == _TIMM_TOWER


def _trunk_spec(tower) -> FamilySpec:
    spec = families.spec_of(tower.trunk)
    if spec is None:
        raise families.UnknownImageEncoderError(
            f"open_clip TimmModel: its trunk {type(tower.trunk).__name__} is no timm family mixres knows")
    return spec


def _tower(model):
    return getattr(model, "visual", model)


# facts (a whole model's spec is this one; its tower may be timm-backed)

def _prefix(tower) -> int:
    return _trunk_spec(tower).prefix_tokens(tower.trunk) if _is_timm_tower(tower) else 1


def _patch(tower) -> int:
    if _is_timm_tower(tower):
        return _trunk_spec(tower).patch_size(tower.trunk)
    return patch_side(tower.patch_size)


def _width(tower) -> int:
    if _is_timm_tower(tower):
        return _trunk_spec(tower).hidden_size(tower.trunk)
    return int(tower.transformer.width)


def _mean_std(tower):
    mean, std = getattr(tower, "image_mean", None), getattr(tower, "image_std", None)
    if mean is None or std is None:
        return OPENAI_CLIP
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# VisionTransformer

def resample_open_clip_table(tower, grid) -> torch.Tensor:
    """(1 + h*w, D) the tower's positional table for `grid`, by timm's resample_abs_pos_embed."""
    from timm.layers import resample_abs_pos_embed

    table = tower.positional_embedding
    return resample_abs_pos_embed(table[None], new_size=list(grid), old_size=list(tower.grid_size),
                                  num_prefix_tokens=1)[0]


def embed(tower, packed, cache) -> Embedded:
    if tower.training and not isinstance(tower.patch_dropout, torch.nn.Identity):
        raise ValueError("packed backend: open_clip patch dropout (training) drops tokens at random; "
                         "call model.eval() or use backend='grouped'")
    x = conv_patches(packed, tower.conv1)
    table = tower.positional_embedding
    pos = cache.per_grid(table, "open_clip", packed, lambda g: resample_open_clip_table(tower, g)[1:])
    x = x + pos.to(x.dtype)
    prefix = tower.class_embedding.reshape(1, -1).to(x.dtype) + table[:1].to(x.dtype)
    hidden, cu = interleave_prefix(prefix, x, packed.cu_seqlens)
    return Embedded(tower.ln_pre(hidden), cu)


def _final_norm(tower):
    return tower.ln_post if tower.attn_pool is None and not tower.final_ln_after_pool else None


def _global_pool(tower, x: torch.Tensor, cu: torch.Tensor):
    """open_clip's _global_pool per image; 'none' gives no per-image vector (None)."""
    if tower.pool_type == "tok":
        return x[cu[:-1].long()]
    if tower.pool_type == "avg":
        return pool_tokens(x, cu, "avg", 1)
    return None


def _attentional(pooler, tokens, cu):
    return mha_pool(pooler.attn, pooler.ln_q(pooler.query), pooler.ln_k(tokens), cu)


def pool(tower, tokens, cu):
    """The tower's pooled output (VisionTransformer._pool, then `@ proj`)."""
    if tower.attn_pool is None:
        pooled = _global_pool(tower, tokens, cu)
        if pooled is not None and tower.final_ln_after_pool:
            pooled = tower.ln_post(pooled)
    elif tower.attn_pool_contrastive is not None:  # 'parallel' / 'cascade'
        x = tower.ln_post(tokens)
        queries = _attentional(tower.attn_pool, x, cu)
        if tower.attn_pool_type == "parallel":
            pooled = _attentional(tower.attn_pool_contrastive, x, cu)
        else:
            b, nq = queries.shape[:2]
            cu_q = torch.arange(b + 1, device=x.device, dtype=torch.int32) * nq
            pooled = _attentional(tower.attn_pool_contrastive, queries.reshape(b * nq, -1), cu_q)
    else:  # CoCa: pool, ln_post, then the global pool over the pooled queries
        q = tower.ln_post(_attentional(tower.attn_pool, tokens, cu))
        b, nq = q.shape[:2]
        pooled = _global_pool(tower, q.reshape(b * nq, -1),
                              torch.arange(b + 1, device=q.device, dtype=torch.int32) * nq)
    if pooled is not None and tower.proj is not None:
        pooled = pooled @ tower.proj
    return pooled


def _layers(tower):
    check_blocks(tower.transformer.resblocks)
    return tower.transformer.resblocks


RECIPE = Recipe(embed=embed, layers=_layers, final_norm=_final_norm, pool=pool, run=run_blocks)


def _call(model, pixels, **kw):
    """The unmodified tower on a batch (grouped / loop backends): tokens as `RECIPE` defines them."""
    tower = _tower(model)
    if kw.get("output_hidden_states"):
        raise ValueError("backend 'grouped' on an open_clip tower reads the last layer only")
    if _is_timm_tower(tower):
        out = (_trunk_spec(tower).call.call or families.call_pixels)(tower.trunk, pixels)
        return SimpleNamespace(last_hidden_state=out.last_hidden_state, hidden_states=None,
                               pooler_output=tower(pixels))
    x = tower.transformer(tower._embeds(pixels))
    norm = _final_norm(tower)
    return SimpleNamespace(last_hidden_state=norm(x) if norm is not None else x, hidden_states=None,
                           pooler_output=tower(pixels) if tower.pool_type != "none" else None)


_CALL = Call(call=_call, crop=_patch, stride=_patch, min_size=_patch,
             grid=lambda tower, H, W: (H // _patch(tower), W // _patch(tower)))

SPEC = register_family(FamilySpec(
    "open_clip", OPENAI_CLIP, prefix_tokens=_prefix,
    classes=("open_clip.transformer.VisionTransformer", "open_clip.model.CLIP",
             "open_clip.model.CustomTextCLIP", "open_clip.coca_model.CoCa"),
    tower=_tower, patch_size=_patch, hidden_size=_width, mean_std_of=_mean_std,
    call=_CALL, recipe=RECIPE))


# TimmModel: the trunk's own recipe, then the trunk's and the tower's heads

def _timm_recipe(tower) -> Recipe:
    recipe = _trunk_spec(tower).recipe
    if recipe is None:
        raise ValueError(f"packed backend: open_clip TimmModel trunk {type(tower.trunk).__name__} has "
                         f"no packed recipe; use backend='grouped'")
    return recipe


def _timm_pool(tower, tokens, cu):
    if not isinstance(tower.head, torch.nn.Sequential) or any(
            type(m).__name__.endswith("AttentionPool2d") for m in tower.head):
        raise ValueError("packed backend: TimmModel with an attention-pool head is not supported")
    pooled = _timm_recipe(tower).pool(tower.trunk, tokens, cu)
    return None if pooled is None else tower.head(tower.trunk.head(pooled))


TIMM_TOWER_RECIPE = Recipe(
    embed=lambda tower, packed, cache: _timm_recipe(tower).embed(tower.trunk, packed, cache),
    layers=lambda tower: _timm_recipe(tower).layers(tower.trunk),
    final_norm=lambda tower: _timm_recipe(tower).final_norm(tower.trunk),
    pool=_timm_pool, run=run_blocks)

TIMM_TOWER_SPEC = register_family(FamilySpec(
    "open_clip_timm", OPENAI_CLIP, prefix_tokens=_prefix, classes=(_TIMM_TOWER,),
    tower=_tower, patch_size=_patch, hidden_size=_width, mean_std_of=_mean_std,
    call=_CALL, recipe=TIMM_TOWER_RECIPE))
