"""NaViT (vit-pytorch's `na_vit.NaViT`, and mixres' transformers wrapper `NaViTModel`).

vit-pytorch's NaViT (Dehghani et al. 2023, "Patch n' Pack") packs images into padded
groups and masks attention with an O(L^2) boolean mask per group. `packed_forward` runs the
same modules on one packed sequence with block-diagonal varlen attention
(`mixres.attention.varlen_attention`, `cu_seqlens` offsets): no padding and no mask. Every
weight is the model's own; only the attention call and the bookkeeping differ, so each
image's tokens and pooled latent equal vit-pytorch's forward (fp32 rel err ~1e-7). Both the
model (`mixres.models.navit`) and the backend (`mixres.encoders.navit`) call it; this file
imports neither.

Supported classes (a table of attention spellings, one per class): `vit_pytorch.na_vit.NaViT`,
`vit_pytorch.na_vit_nested_tensor.NaViT` (where it imports) and `NaViTModel` (unwrapped to
its `.navit`). Token dropout is never applied here (it subsamples patches at random);
attention dropout > 0 in training mode is refused, as varlen attention has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import torch
from einops import rearrange, repeat
from torch import nn

from mixres.attention import varlen_attention
from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.common import patch_call
from mixres.packing import PackedImages, local_positions, segment_ids

__all__ = ["SPEC", "RECIPE", "unwrap_navit", "packed_forward", "spelling_of", "Spelling"]


# spellings: how each NaViT class spells q/k/v, the softmax scale and the pooling residual

@dataclass(frozen=True)
class Spelling:
    qkv: Callable  # (attn, x (Tq, D), context (Tk, D)) -> q (Tq, h, d), k, v (Tk, h, d), q/k normed
    scale: float | None  # None: SDPA's default 1/sqrt(d)
    pool_residual: bool  # na_vit adds the queries back after attention pooling
    attn_dropout: Callable  # attn -> its attention dropout probability


def _qkv_navit(attn, x, context):
    q = rearrange(attn.to_q(x), 't (h d) -> h t d', h=attn.heads)
    k, v = (rearrange(t, 't (h d) -> h t d', h=attn.heads) for t in attn.to_kv(context).chunk(2, dim=-1))
    q, k = attn.q_norm(q), attn.k_norm(k)  # RMSNorm gamma is (heads, 1, d): heads lead
    return (rearrange(t, 'h t d -> t h d') for t in (q, k, v))


def _qkv_nested(attn, x, context):
    def split(t):
        return rearrange(t, 't (h d) -> t h d', h=attn.heads)
    q = attn.query_norm(split(attn.to_queries(x)))  # LayerNorm over d, or Identity
    k = attn.key_norm(split(attn.to_keys(context)))
    return q, k, split(attn.to_values(context))


@lru_cache(maxsize=1)
def _spellings() -> dict[type, Spelling]:
    from vit_pytorch import na_vit

    # na_vit's q/k RMSNorm already multiplies by sqrt(d), so SDPA runs with scale 1
    table = {na_vit.NaViT: Spelling(_qkv_navit, 1.0, True, lambda a: a.dropout_p)}
    try:
        from vit_pytorch import na_vit_nested_tensor
    except ImportError:  # needs torch.nested; older vit-pytorch releases lack the file
        return table
    table[na_vit_nested_tensor.NaViT] = Spelling(_qkv_nested, None, False, lambda a: a.dropout)
    return table


def unwrap_navit(model: nn.Module) -> nn.Module:
    """The vit-pytorch NaViT inside `model` (a bare NaViT or the transformers NaViTModel)."""
    if type(model) in _spellings():
        return model
    inner = getattr(model, "navit", None)  # mixres.models.navit.NaViTModel keeps it there
    if type(inner) in _spellings() and getattr(getattr(model, "config", None), "model_type", None) == "navit":
        return inner
    raise TypeError(f"navit backend: expected a vit_pytorch NaViT or mixres NaViTModel, got "
                    f"{type(model).__module__}.{type(model).__name__}; supported: "
                    f"{sorted(f'{c.__module__}.{c.__name__}' for c in _spellings())}")


def spelling_of(navit: nn.Module) -> Spelling:
    return _spellings()[type(unwrap_navit(navit))]


# blocks

def patch_positions(grid_hw: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every packed patch, row-major within each image: two (N,) long tensors."""
    idx = local_positions(cu_seqlens)
    width = grid_hw[:, 1].to(cu_seqlens.device)[segment_ids(cu_seqlens)]
    return idx // width, idx % width


def embed(navit: nn.Module, packed: PackedImages) -> torch.Tensor:
    """Patch embedding + factorized 2-D position embedding: (N, c*p*p) -> (N, D)."""
    rows, cols = patch_positions(packed.grid_hw, packed.cu_seqlens)
    max_h, max_w = navit.pos_embed_height.shape[0], navit.pos_embed_width.shape[0]
    if int(packed.grid_hw[:, 0].max()) > max_h or int(packed.grid_hw[:, 1].max()) > max_w:
        p = navit.patch_size
        raise ValueError(f"navit backend: an image grid of {packed.grid_hw.max(0).values.tolist()} "
                         f"patches exceeds the model's position embeddings ({max_h}x{max_w} patches, "
                         f"image_size {max_h * p}x{max_w * p}); resize the image or build the model "
                         f"with a larger image_size")
    x = navit.to_patch_embedding(packed.patches)
    x = x + navit.pos_embed_height[rows] + navit.pos_embed_width[cols]
    return navit.dropout(x)


def attention(attn: nn.Module, recipe: Spelling, x: torch.Tensor, cu_q, cu_k, max_q: int, max_k: int,
              context: torch.Tensor | None = None) -> torch.Tensor:
    """One NaViT attention block on packed tokens: x (Tq, D), context (Tk, D) -> (Tq, D).

    As in vit-pytorch, queries come from norm(x) and keys/values from `context` when
    given (attention pooling reads the transformer output un-normed), else from norm(x).
    """
    if attn.training and recipe.attn_dropout(attn) > 0:
        raise ValueError(f"navit backend: attention dropout {recipe.attn_dropout(attn)} in training "
                         f"mode is not supported by varlen attention; call model.eval() or set dropout=0")
    x = attn.norm(x)
    q, k, v = recipe.qkv(attn, x, x if context is None else context)
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, scale=recipe.scale)
    return attn.to_out(rearrange(out, 't h d -> t (h d)'))


def transformer(navit: nn.Module, recipe: Spelling, x: torch.Tensor, cu: torch.Tensor, max_len: int,
                num_layers: int, final_norm: bool, collect: list | None = None) -> torch.Tensor:
    """The first `num_layers` pre-norm blocks on packed tokens (N, D), then the final norm if asked.

    `collect`, when given, receives the input and every block's output (HF hidden_states).
    """
    if collect is not None:
        collect.append(x)
    x = blocks(navit.transformer.layers[:num_layers], recipe, x, cu, max_len, collect)
    return navit.transformer.norm(x) if final_norm else x


def blocks(layers, spelling: Spelling, x: torch.Tensor, cu: torch.Tensor, max_len: int,
           collect: list | None = None) -> torch.Tensor:
    """NaViT's (attention, feed-forward) pairs on packed tokens (N, D), pre-norm residuals."""
    for attn, ff in layers:
        x = attention(attn, spelling, x, cu, cu, max_len, max_len) + x
        x = ff(x) + x
        if collect is not None:
            collect.append(x)
    return x


def attention_pool(navit: nn.Module, recipe: Spelling, x: torch.Tensor, cu: torch.Tensor,
                   max_len: int) -> torch.Tensor:
    """One learned query per image attends to that image's tokens: (N, D) -> (B, D) latents."""
    b = cu.numel() - 1
    queries = repeat(navit.attn_pool_queries, 'd -> b d', b=b)
    cu_q = torch.arange(b + 1, device=cu.device, dtype=torch.int32)
    out = attention(navit.attn_pool, recipe, queries, cu_q, cu, 1, max_len, context=x)
    if recipe.pool_residual:
        out = out + queries
    return navit.to_latent(out)


def packed_forward(model: nn.Module, packed: PackedImages, select_layer: int = -1,
                   hidden_states: list | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed tokens (N, D) and pooled latents (B, D) of a NaViT (pooled None unless select_layer=-1).

    select_layer -1: final-norm output (and the pooled latent); otherwise the HF
    `hidden_states[select_layer]` convention (0 = embeddings, -2 = penultimate block), no norm.
    `hidden_states`, when given, receives the packed (N, D) hidden states computed.
    """
    navit = unwrap_navit(model)
    recipe = spelling_of(navit)
    _check_input(navit, packed)
    depth = len(navit.transformer.layers)
    if not -(depth + 1) <= select_layer <= depth:
        raise ValueError(f"navit backend: select_layer {select_layer} out of range for {depth} blocks "
                         f"(hidden states 0..{depth}, or -1..-{depth + 1})")
    cu = packed.cu_seqlens.to(torch.int32)
    max_len = packed.max_seqlen
    x = embed(navit, packed)
    if select_layer != -1:
        return transformer(navit, recipe, x, cu, max_len, select_layer % (depth + 1), False,
                           hidden_states), None
    x = transformer(navit, recipe, x, cu, max_len, depth, True, hidden_states)
    return x, attention_pool(navit, recipe, x, cu, max_len)


def _check_input(navit: nn.Module, packed: PackedImages) -> None:
    if packed.channels != navit.channels or packed.patch_size != navit.patch_size:
        raise ValueError(f"navit backend: the model takes {navit.channels}-channel images at patch "
                         f"{navit.patch_size}, got {packed.channels} channels at patch {packed.patch_size}")


# the packed recipe: the packed backend runs NaViT like any family whose blocks HF cannot reach

def _embed(tower: nn.Module, packed: PackedImages, cache) -> Embedded:
    navit = unwrap_navit(tower)
    _check_input(navit, packed)
    cu = packed.cu_seqlens.to(torch.int32)
    return Embedded(embed(navit, packed), cu, {"spelling": spelling_of(navit), "max_len": packed.max_seqlen})


def _run(layers, hidden: torch.Tensor, cu: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """`blocks` on the packed sequence (1, N, D): the Recipe's runner."""
    return blocks(layers, layer_kwargs["spelling"], hidden[0], cu, layer_kwargs["max_len"])[None]


def _pool(tower: nn.Module, tokens: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    navit = unwrap_navit(tower)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return attention_pool(navit, spelling_of(navit), tokens, cu, max_len)


RECIPE = Recipe(embed=_embed, layers=lambda tower: unwrap_navit(tower).transformer.layers,
                final_norm=lambda tower: unwrap_navit(tower).transformer.norm, pool=_pool, run=_run)


# the whole-model call (loop, grouped): vit-pytorch's own forward, read back with hooks

def call_whole(tower: nn.Module, pixels: torch.Tensor, output_hidden_states: bool = False, **kw):
    """vit-pytorch's forward on same-size images (B, C, H, W), read back with forward hooks.

    The images go in as one list (one group: each image attends to itself only). Tokens are
    `transformer`'s output (after its final norm), the pooled latent is `mlp_head`'s input,
    hidden_states the embeddings then each block's residual output (a hook on each block's
    feed-forward: its input plus its output). No mixres code runs the model: this is the
    reference the packed forward above is compared with.
    """
    navit = unwrap_navit(tower)
    b = pixels.shape[0]
    seen, hidden = {}, []

    def per_image(t):  # one padded group (1, B*n, D) or a jagged nested tensor -> (B, n, D)
        return torch.stack(t.unbind()) if t.is_nested else t.reshape(b, -1, t.shape[-1])

    hooks = [navit.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o)),
             navit.mlp_head.register_forward_pre_hook(lambda m, i: seen.__setitem__("pooled", i[0]))]
    if output_hidden_states:
        hooks.append(navit.transformer.register_forward_pre_hook(lambda m, i: hidden.append(i[0])))
        hooks += [ff.register_forward_hook(lambda m, i, o: hidden.append(i[0] + o))
                  for _, ff in navit.transformer.layers]
    try:
        logits = navit(list(pixels))
    finally:
        for h in hooks:
            h.remove()
    return SimpleNamespace(last_hidden_state=per_image(seen["tokens"]), pooler_output=seen["pooled"],
                           hidden_states=tuple(map(per_image, hidden)) or None, logits=logits)


# the spec: a Recipe with its own runner; encode_images goes to the "navit" backend (the
# packed backend with the shrink-to-fit of the position tables)

def _mean_std(tower):
    # NaViT defines no pixel normalization: mean = std = 0.5 per channel (pixels to [-1, 1])
    c = unwrap_navit(tower).channels if tower is not None else 3
    return (0.5,) * c, (0.5,) * c


SPEC = register_family(FamilySpec(
    "navit", _mean_std(None), classes=("vit_pytorch.na_vit.NaViT", "vit_pytorch.na_vit_nested_tensor.NaViT"),
    tower=lambda model: model, patch_size=lambda tower: unwrap_navit(tower).patch_size,
    hidden_size=lambda tower: int(unwrap_navit(tower).pos_embed_height.shape[-1]),
    num_layers=lambda tower: len(unwrap_navit(tower).transformer.layers), mean_std_of=_mean_std,
    call=patch_call(call=call_whole, whole_patches=True), recipe=RECIPE, backend="navit"))
