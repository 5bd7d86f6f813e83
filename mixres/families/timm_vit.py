"""timm `VisionTransformer` (vit_*, deit3_*, the DINOv2 / SigLIP ports, *_reg4_*), packed.

What is matched is timm's `forward_features` with `dynamic_img_size=True` (tokens: prefix then
patches, after `norm`) and `forward_head(pre_logits=True)` (pooled: pool, fc_norm, head_drop):

- prefix: class token (if any) then `reg_tokens` registers;
- positions: `pos_embed` resampled to each image's grid by timm's own `resample_abs_pos_embed`
  (old size = the model's `patch_embed.grid_size`, bicubic, antialiased, float32), cached per
  grid; with `no_embed_class` the prefix gets no position code, else the table's first rows;
- pooling: 'token', 'avg' / 'max' / 'avgmax' over the patches (or all tokens with
  `pool_include_prefix`), 'map' = `AttentionPoolLatent` with each image's latent queries as
  one varlen set, then `fc_norm` and `head_drop`; '' gives no pooled output.

A model built without `dynamic_img_size` gives the same tokens at its native size (timm's
resample returns the table unchanged there); other sizes are what timm computes with the flag.
Patch embeddings other than timm's conv `PatchEmbed` (hybrid CNN stems) are refused: grouped.
"""

from __future__ import annotations

import torch

from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.common import conv_patches
from mixres.families.spec import IMAGENET_DEFAULT, Call
from mixres.families.timm_blocks import check_blocks, drop_prefix, latent_pool, pool_tokens, run_blocks
from mixres.packing import interleave_prefix

__all__ = ["SPEC", "RECIPE", "timm_mean_std", "patch_side", "patch_tokens", "prefix_tokens",
           "resampled_patch_pos", "finish_pool", "head_pool", "layers", "patch_embed_size", "timm_call",
           "whole_call"]


# facts shared by the timm families

def timm_mean_std(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean / std of the model's pretrained_cfg, as timm's `resolve_data_config` resolves them."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def patch_side(patch_size) -> int:
    sides = {int(v) for v in (patch_size if isinstance(patch_size, (tuple, list)) else (patch_size,))}
    if len(sides) != 1:
        raise ValueError(f"patch size {tuple(patch_size)} is not square; mixres cuts images into "
                         f"square patches")
    return sides.pop()


def patch_tokens(tower, packed) -> torch.Tensor:
    """(N, D) packed patches through timm's PatchEmbed (conv as one GEMM, then its norm)."""
    pe = tower.patch_embed
    if type(pe).__name__ != "PatchEmbed" or not isinstance(pe.proj, torch.nn.Conv2d):
        raise ValueError(f"packed backend: patch embedding {type(pe).__name__} is not a plain conv "
                         f"PatchEmbed; use backend='grouped'")
    return pe.norm(conv_patches(packed, pe.proj))


def prefix_tokens(tower) -> int:
    return int(tower.num_prefix_tokens)


def prefix_rows(tower, dim: int) -> list[torch.Tensor]:
    rows = []
    if getattr(tower, "cls_token", None) is not None:
        rows.append(tower.cls_token.reshape(1, dim))
    if getattr(tower, "reg_token", None) is not None:
        rows.append(tower.reg_token.reshape(-1, dim))
    return rows


def resampled_patch_pos(tower, table: torch.Tensor, num_prefix: int, grid) -> torch.Tensor:
    """(h*w, D) patch rows of `table` (1, num_prefix + n, D) resampled to `grid` as timm does."""
    from timm.layers import resample_abs_pos_embed

    pos = resample_abs_pos_embed(table, new_size=list(grid), old_size=tower.patch_embed.grid_size,
                                 num_prefix_tokens=num_prefix)
    return pos[0, num_prefix:]


def _check_training(tower) -> None:
    drop = getattr(tower, "patch_drop", None)
    if tower.training and drop is not None and not isinstance(drop, torch.nn.Identity):
        raise ValueError("packed backend: timm patch dropout (training) drops tokens per image at "
                         "random; call model.eval() or use backend='grouped'")


def embed(tower, packed, cache) -> Embedded:
    _check_training(tower)
    x = patch_tokens(tower, packed)
    dim = x.shape[-1]
    prefix = prefix_rows(tower, dim)
    p = len(prefix) and sum(r.shape[0] for r in prefix)
    prefix = torch.cat(prefix) if prefix else x.new_zeros(0, dim)
    table = tower.pos_embed
    if table is not None:
        with_prefix = 0 if tower.no_embed_class else p
        pos = cache.per_grid(table, f"timm-vit{with_prefix}", packed,
                             lambda g: resampled_patch_pos(tower, table, with_prefix, g))
        x = x + pos
        if with_prefix:
            prefix = prefix + table[0, :p]
    hidden, cu = interleave_prefix(prefix, x, packed.cu_seqlens)
    return Embedded(tower.norm_pre(tower.pos_drop(hidden)), cu)


def finish_pool(tower, pooled):
    if pooled is None:
        return None
    return tower.head_drop(tower.fc_norm(pooled))


def head_pool(tower, tokens, cu, prefix: int):
    """forward_head(pre_logits=True) of a model with `pool_include_prefix` (VisionTransformer,
    NaFlexVit): attention or global pooling, then fc_norm and head_drop."""
    if tower.attn_pool is not None:
        if not tower.pool_include_prefix:
            tokens, cu = drop_prefix(tokens, cu, prefix)
        return finish_pool(tower, latent_pool(tower.attn_pool, tokens, cu))
    return finish_pool(tower, pool_tokens(tokens, cu, tower.global_pool, prefix, tower.pool_include_prefix))


def pool(tower, tokens, cu):
    """forward_head(pre_logits=True): VisionTransformer.pool, fc_norm, head_drop."""
    return head_pool(tower, tokens, cu, prefix_tokens(tower))


def layers(tower):
    """`tower.blocks`, checked to be blocks the shared runner knows (timm ViT, Eva, NaFlexVit)."""
    check_blocks(tower.blocks)
    return tower.blocks


def timm_call(model, pixels, **kw):
    """The whole timm model on a batch: forward_features and forward_head(pre_logits=True)."""
    from types import SimpleNamespace

    if kw.get("output_hidden_states"):
        raise ValueError("backend 'grouped' on a timm model reads the last layer only (select_layer=-1)")
    raw = model.forward_features(pixels)
    pooled = model.forward_head(raw, pre_logits=True)
    feats = raw
    if raw.ndim == 4 and getattr(model, "output_fmt", "NCHW") == "NHWC":
        feats = raw.permute(0, 3, 1, 2)  # Swin-style NHWC maps as (B, C, h, w)
    return SimpleNamespace(last_hidden_state=feats, pooler_output=pooled, hidden_states=None)


def whole_call(patch_of) -> Call:
    """The grouped / loop call of a timm patch model (Call callables get the model itself)."""
    def grid(tower, H, W):
        p = patch_of(tower)
        return H // p, W // p
    return Call(call=timm_call, crop=patch_of, grid=grid, stride=patch_of, min_size=patch_of)


def patch_embed_size(tower) -> int:
    return patch_side(tower.patch_embed.patch_size)


RECIPE = Recipe(embed=embed, layers=layers, final_norm=lambda t: t.norm, pool=pool, run=run_blocks)

SPEC = register_family(FamilySpec(
    "timm_vit", IMAGENET_DEFAULT, prefix_tokens=prefix_tokens,
    classes=("timm.models.vision_transformer.VisionTransformer",),
    tower=lambda model: model,
    patch_size=patch_embed_size,
    hidden_size=lambda tower: int(tower.embed_dim),
    mean_std_of=timm_mean_std,
    call=whole_call(patch_embed_size),
    recipe=RECIPE))
