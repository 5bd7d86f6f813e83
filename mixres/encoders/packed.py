"""Packed execution of pretrained HF ViT-family encoders (NaViT-style patch-n-pack).

All images of a chunk become ONE sequence (1, N_total, D): each image's prefix tokens
(CLS, distillation, registers) then its patches row-major. The model's own encoder layers
run on it unchanged; only the attention function is swapped, for the duration of the
call, to the registered "mixres_varlen" (block-diagonal over `cu_seqlens`), so every
image attends only to itself and its tokens equal the model run on that image alone.

What differs per family is small and lives in a `Recipe` (a table keyed by
`mixres.vision_utils.family`, the vision config's model_type without "_vision_model"):

    embed(tower, packed, cache) -> Embedded   patch projection as ONE GEMM over all packed
                                              patches, prefix tokens inserted per image,
                                              the family's own position-code interpolation
                                              per grid (cached), embedding norm/dropout
    final_norm(tower) -> module | None        what turns the last layer into last_hidden_state
    pool(tower, tokens, cu) -> (B, D') | None the family's pooler_output

`Embedded.layer_kwargs` carries extra per-layer kwargs: the RoPE family (DINOv3 ViT)
returns each image's rotary (cos, sin) concatenated in packed order as
`position_embeddings` there (identity rows at prefix tokens); nothing else changes.

The user's model is never modified: the attention implementation of the tower's
configs is restored in `finally`, no hooks are installed and no module is patched.
(Concurrent encodes of the SAME model object from several threads are not supported,
because the attention implementation lives on the shared config.)
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mixres import vision_utils
from mixres.attention import hf_varlen_kwargs, register_hf_attention, varlen_attention, varlen_context
from mixres.encoders import register_backend
from mixres.encoders.base import Encoder
from mixres.packing import PackedFeatures, PackedImages, seqlens_to_cu
from mixres.vision_utils import vision_tower

__all__ = ["PackedEncoder", "Recipe", "Embedded", "RECIPES", "register_recipe", "recipe_for",
           "resolve_layer"]


# helpers

def resolve_layer(select_layer: int, num_layers: int) -> int:
    """Index into HF's hidden_states (0 = embeddings, num_layers = last layer, pre-norm)."""
    idx = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= idx <= num_layers:
        raise ValueError(f"select_layer={select_layer} is out of range for a model with {num_layers} "
                         f"layers (hidden_states has {num_layers + 1} entries)")
    return idx


def _project(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """All packed patches through the patch embedding as one GEMM."""
    return F.linear(patches, weight.flatten(1), bias)


def _conv_patches(packed: PackedImages, conv: nn.Conv2d) -> torch.Tensor:
    """(N, D) patch tokens of a stride-p conv patch embedding, packed patches cast to its dtype."""
    return _project(packed.patches.to(conv.weight.dtype), conv.weight, conv.bias)


def _with_prefix(prefix: torch.Tensor, patch_tokens: torch.Tensor,
                 packed: PackedImages) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, D) prefix + (N, D) packed patch tokens -> (N + B*P, D) with each image's prefix first.

    One gather from cat([prefix, patches]) so autograd sees a single differentiable op.
    """
    p = prefix.shape[0]
    if p == 0:
        return patch_tokens, packed.cu_seqlens
    dev = patch_tokens.device
    lens = packed.seqlens.to(dev).long() + p
    cu = seqlens_to_cu(lens, device=dev)
    b = lens.numel()
    t = torch.arange(int(lens.sum()), device=dev)
    image = torch.repeat_interleave(torch.arange(b, device=dev), lens)
    local = t - cu[:-1].long()[image]
    idx = torch.where(local < p, local, t + p - p * (image + 1))  # patch j sits at P + j
    return torch.cat([prefix.to(patch_tokens.dtype), patch_tokens]).index_select(0, idx), cu


class PosCache:
    """LRU of per-grid position codes, keyed by (what, grid, dtype, device, weight version).

    The weight's `_version` is part of the key, so an optimizer step invalidates entries.
    Nothing is cached while the table needs a gradient (the graph must be rebuilt per call).
    """

    def __init__(self, maxsize: int = 512):
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()

    def get(self, table: torch.Tensor, tag: str, grid: tuple[int, int],
            compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled() and table.requires_grad:
            return compute()
        key = (tag, id(table), table._version, grid, table.dtype, table.device,
               torch.is_inference_mode_enabled())
        hit = self._data.get(key)
        if hit is not None:
            self._data.move_to_end(key)
            return hit
        value = compute()
        self._data[key] = value
        if len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        return value

    def per_grid(self, table: torch.Tensor, tag: str, packed: PackedImages,
                 compute: Callable[[tuple[int, int]], torch.Tensor]) -> torch.Tensor:
        """(N, D) position codes of every packed patch, image after image."""
        grids = [tuple(g) for g in packed.grid_hw.tolist()]
        return torch.cat([self.get(table, tag, g, lambda g=g: compute(g)) for g in grids])


def _bicubic(table: torch.Tensor, grid: tuple[int, int], *, fp32: bool = False,
             antialias: bool = False) -> torch.Tensor:
    """(n, D) square table of patch position codes -> (h*w, D) for `grid`, as HF's
    `interpolate_pos_encoding` does it (including its skip when the grid is the native one).

    fp32: DINOv2 interpolates in float32 and casts back; antialias: DINOv2-with-registers.
    """
    n, dim = table.shape
    s = int(math.sqrt(n))
    h, w = grid
    if h == w and h * w == n:
        return table
    x = table.reshape(1, s, s, dim).permute(0, 3, 1, 2)
    dtype = x.dtype
    kw = {"antialias": True} if antialias else {}
    x = F.interpolate(x.float() if fp32 else x, size=(h, w), mode="bicubic", align_corners=False, **kw)
    return x.to(dtype).permute(0, 2, 3, 1).reshape(h * w, dim)


# recipes

@dataclass
class Embedded:
    """The packed input of the first layer.

    hidden       (N', D) every image's prefix tokens then its patches
    cu_seqlens   (B+1,) offsets of each image in `hidden`
    num_prefix   prefix tokens per image
    layer_kwargs extra kwargs for every layer (e.g. RoPE `position_embeddings`)
    """

    hidden: torch.Tensor
    cu_seqlens: torch.Tensor
    num_prefix: int
    layer_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """How one family embeds, which layers it runs, how it finishes and pools."""

    embed: Callable[[nn.Module, PackedImages, PosCache], Embedded]
    layers: Callable[[nn.Module], nn.ModuleList]
    final_norm: Callable[[nn.Module], nn.Module | None]
    pool: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor | None]


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, *families: str) -> Recipe:
    """Make `recipe` the packed recipe of these `vision_utils.family` keys ("vit", "clip", ...;
    a vision config's model_type such as "clip_vision_model" is taken too).

    The family's prefix-token count, patch size and normalization are `vision_utils`' to know:
    a new family needs its row in `vision_utils.FAMILIES` as well.
    """
    for f in families:
        RECIPES[f.removesuffix("_vision_model")] = recipe
    return recipe


def recipe_for(tower: nn.Module) -> Recipe:
    try:
        key = vision_utils.family(tower)
    except vision_utils.UnknownImageEncoderError:
        key = None
    if key not in RECIPES:
        raise ValueError(f"packed backend: no recipe for model_type {key!r} "
                         f"({type(tower).__name__}); supported: {sorted(RECIPES)}. "
                         f"backend='loop' or 'grouped' run any HF vision model")
    return RECIPES[key]


# ViT / DeiT: conv patches, CLS (+ distillation) token, bicubic position codes, dropout

def _vit_prefix(emb: nn.Module) -> list[torch.Tensor]:
    tokens = [emb.cls_token.reshape(1, -1)]
    if getattr(emb, "distillation_token", None) is not None:  # DeiT
        tokens.append(emb.distillation_token.reshape(1, -1))
    return tokens


def _embed_vit(tower, packed, cache):
    emb = tower.embeddings
    x = _conv_patches(packed, emb.patch_embeddings.projection)
    table = emb.position_embeddings[0]
    p = len(_vit_prefix(emb))
    prefix = torch.cat(_vit_prefix(emb)) + table[:p]
    pos = cache.per_grid(table, "vit", packed, lambda g: _bicubic(table[p:], g))
    hidden, cu = _with_prefix(prefix, x + pos, packed)
    return Embedded(emb.dropout(hidden), cu, p)


def _pool_vit(tower, tokens, cu):
    if getattr(tower, "pooler", None) is None:
        return None
    return tower.pooler(tokens[cu[:-1].long()][:, None])  # HF's pooler reads hidden[:, 0]


register_recipe(Recipe(embed=_embed_vit, layers=lambda t: t.layers, final_norm=lambda t: t.layernorm,
                       pool=_pool_vit),
                "vit", "deit")


# CLIP: bias-free conv, class embedding, pre-layernorm; last_hidden_state has no final norm

def _embed_clip(tower, packed, cache):
    emb = tower.embeddings
    x = _conv_patches(packed, emb.patch_embedding)
    table = emb.position_embedding.weight
    prefix = emb.class_embedding.reshape(1, -1) + table[:1]
    pos = cache.per_grid(table, "clip", packed, lambda g: _bicubic(table[1:], g))
    hidden, cu = _with_prefix(prefix, x + pos, packed)
    return Embedded(tower.pre_layrnorm(hidden), cu, 1)


register_recipe(Recipe(embed=_embed_clip, layers=lambda t: t.encoder.layers, final_norm=lambda t: None,
                       pool=lambda t, tok, cu: t.post_layernorm(tok[cu[:-1].long()])),
                "clip")


# SigLIP / SigLIP2: no prefix, post-layernorm, attention-pooling head

def _attention_pool(tower, tokens, cu):
    """SigLIP's MultiheadAttentionPoolingHead with ONE probe query per image, varlen.

    Replicates nn.MultiheadAttention (in_proj, per-head softmax attention, out_proj) with
    its own weights, then the head's layernorm + MLP residual.
    """
    head = getattr(tower, "head", None)
    if head is None or not getattr(tower, "use_head", True):
        return None
    mha = head.attention
    if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
        raise ValueError("packed backend: SigLIP pooling head with add_bias_kv / add_zero_attn / "
                         "separate q,k,v projections is not supported")
    d, nh = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
    b = cu.numel() - 1
    q = F.linear(head.probe.reshape(1, d), wq, bq).expand(b, d).reshape(b, nh, d // nh).contiguous()
    k = F.linear(tokens, wk, bk).reshape(-1, nh, d // nh)
    v = F.linear(tokens, wv, bv).reshape(-1, nh, d // nh)
    cu_q = torch.arange(b + 1, device=tokens.device, dtype=torch.int32)
    max_k = int((cu[1:] - cu[:-1]).max())
    o = varlen_attention(q, k, v, cu_q, cu.to(torch.int32), 1, max_k)
    o = mha.out_proj(o.reshape(b, d))
    return o + head.mlp(head.layernorm(o))


def _embed_siglip(tower, packed, cache):
    emb = tower.embeddings
    x = _conv_patches(packed, emb.patch_embedding)
    table = emb.position_embedding.weight
    pos = cache.per_grid(table, "siglip", packed, lambda g: _bicubic(table, g))
    return Embedded(x + pos, packed.cu_seqlens, 0)


def _siglip2_pos(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Siglip2VisionEmbeddings.resize_positional_embeddings for one image (no padding)."""
    s = int(math.sqrt(table.shape[0]))
    x = table.reshape(s, s, -1).permute(2, 0, 1)[None]
    if x.device.type == "cpu":  # as HF: antialias needs float32 on CPU
        x = x.float()
    h, w = grid
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.reshape(-1, h * w).transpose(0, 1).to(table.dtype)


def _embed_siglip2(tower, packed, cache):
    emb = tower.embeddings
    lin = emb.patch_embedding
    p, c = packed.patch_size, packed.channels
    # NaFlex patches are channel-last (ph, pw, c); ours are channel-major (c, ph, pw)
    w = lin.weight.reshape(-1, p, p, c).permute(0, 3, 1, 2)
    x = _project(packed.patches.to(w.dtype), w, lin.bias)
    table = emb.position_embedding.weight
    pos = cache.per_grid(table, "siglip2", packed, lambda g: _siglip2_pos(table, g))
    return Embedded(x + pos, packed.cu_seqlens, 0)


_siglip_common = dict(layers=lambda t: t.encoder.layers, final_norm=lambda t: t.post_layernorm,
                      pool=_attention_pool)
register_recipe(Recipe(embed=_embed_siglip, **_siglip_common), "siglip")
register_recipe(Recipe(embed=_embed_siglip2, **_siglip_common), "siglip2")


# DINOv2 (+ registers): float32 bicubic (antialiased with registers), registers after CLS

def _embed_dinov2(tower, packed, cache):
    emb = tower.embeddings
    x = _conv_patches(packed, emb.patch_embeddings.projection)
    table = emb.position_embeddings[0]
    registers = getattr(emb, "register_tokens", None)
    antialias = registers is not None
    prefix = [emb.cls_token.reshape(1, -1) + table[:1]]
    if registers is not None:  # registers get no position code
        prefix.append(registers[0])
    prefix = torch.cat(prefix)
    pos = cache.per_grid(table, f"dinov2{antialias}", packed,
                         lambda g: _bicubic(table[1:], g, fp32=True, antialias=antialias))
    hidden, cu = _with_prefix(prefix, x + pos, packed)
    return Embedded(emb.dropout(hidden), cu, prefix.shape[0])


register_recipe(Recipe(embed=_embed_dinov2, layers=lambda t: t.encoder.layer,
                       final_norm=lambda t: t.layernorm, pool=lambda t, tok, cu: tok[cu[:-1].long()]),
                "dinov2", "dinov2_with_registers")


# DINOv3 ViT: CLS + registers, no absolute position codes; 2-D RoPE on patch tokens only

def _patch_centers(h: int, w: int, device) -> torch.Tensor:
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


def _dinov3_rope(rope: nn.Module, grid: tuple[int, int], dtype: torch.dtype, augment: dict | None,
                 device) -> torch.Tensor:
    """(h*w, 2*head_dim) [cos | sin] of one image, as DINOv3ViTRopePositionEmbedding computes
    them for that image alone: float32 angles from the (possibly low-precision) inv_freq
    buffer, autocast off (transformers 5.17 forces that), cast to the patch weights' dtype."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        coords = _patch_centers(*grid, device)
        if augment is not None:  # one random draw per image, as each image alone would get
            from transformers.models.dinov3_vit import modeling_dinov3_vit as hf
            coords = hf.augment_patches_center_coordinates(coords, **augment)
        angles = 2 * math.pi * coords[:, :, None] * rope.inv_freq[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        return torch.cat([torch.cos(angles), torch.sin(angles)], -1).to(dtype)


def _embed_dinov3(tower, packed, cache):
    """Prefix tokens (CLS, then registers) get no position code and, in HF, no rotation:
    its apply_rotary_pos_emb rotates the LAST cos.shape[-2] tokens of the sequence and
    leaves the first (seq_len - that) alone. In a packed sequence the prefixes sit inside,
    so cos/sin are built full-length, with identity rows (cos 1, sin 0) at every prefix
    position: q * 1 + rotate_half(q) * 0 == q exactly, and every token goes through the
    same formula."""
    emb = tower.embeddings
    conv = emb.patch_embeddings
    x = _conv_patches(packed, conv)
    prefix = torch.cat([emb.cls_token.reshape(1, -1), emb.register_tokens.reshape(-1, x.shape[-1])])
    hidden, cu = _with_prefix(prefix, x, packed)

    rope, dtype = tower.rope_embeddings, conv.weight.dtype
    augment = _rope_augmentation(rope)
    grids = [tuple(g) for g in packed.grid_hw.tolist()]
    if augment is None:  # eval: deterministic per (grid, dtype, device), cached
        rows = [cache.get(rope.inv_freq, f"dinov3-rope-{dtype}", g,
                          lambda g=g: _dinov3_rope(rope, g, dtype, None, x.device)) for g in grids]
    else:
        rows = [_dinov3_rope(rope, g, dtype, augment, x.device) for g in grids]
    head_dim = rows[0].shape[-1] // 2
    identity = torch.cat([x.new_ones(prefix.shape[0], head_dim), x.new_zeros(prefix.shape[0], head_dim)], -1)
    cos_sin, _ = _with_prefix(identity.to(dtype), torch.cat(rows), packed)
    cos, sin = cos_sin.split(head_dim, -1)
    return Embedded(hidden, cu, prefix.shape[0], {"position_embeddings": (cos, sin)})


register_recipe(Recipe(embed=_embed_dinov3, layers=lambda t: t.model.layer, final_norm=lambda t: t.norm,
                       pool=lambda t, tok, cu: tok[cu[:-1].long()]),  # pooler_output: normed CLS
                "dinov3_vit")


# running HF layers on the packed sequence

@contextlib.contextmanager
def varlen_attention_impl(tower: nn.Module):
    """Switch the tower's configs to "mixres_varlen" and restore them exactly afterwards."""
    from transformers import PretrainedConfig

    name = register_hf_attention()
    configs = {id(c): c for m in tower.modules()
               if isinstance(c := getattr(m, "config", None), PretrainedConfig)}
    saved = {k: c._attn_implementation_internal for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation_internal = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = saved[k]


_SIGNATURES: dict[type, tuple[bool, bool]] = {}


def _layer_signature(layer: nn.Module) -> tuple[bool, bool]:
    """(takes attention_mask, takes **kwargs) of a layer's forward, cached per class."""
    cls = type(layer)
    if cls not in _SIGNATURES:
        params = inspect.signature(layer.forward).parameters
        _SIGNATURES[cls] = ("attention_mask" in params,
                            any(p.kind is p.VAR_KEYWORD for p in params.values()))
    return _SIGNATURES[cls]


def run_layers(layers, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """hidden (1, N, D) through `layers`; the varlen offsets reach the attention via kwargs,
    or via `varlen_context` for layers that do not forward them (DINOv2, transformers 5.17)."""
    with varlen_context(kwargs):
        for layer in layers:
            takes_mask, takes_kwargs = _layer_signature(layer)
            kw = dict(kwargs) if takes_kwargs else {}
            if takes_mask:
                kw["attention_mask"] = None
            out = layer(hidden, **kw)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@register_backend("packed")
class PackedEncoder(Encoder):
    """Patch-n-pack execution of an HF ViT / DeiT / CLIP / SigLIP / SigLIP2 / DINOv2 / DINOv3 ViT
    encoder."""

    cpu_chunk_tokens = 2048  # see Encoder: cache-sized GEMMs on the CPU

    # patch_size, mean_std and num_prefix are the base class's: asked of mixres.vision_utils

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self.tower = vision_tower(self.model)
        self.recipe = recipe_for(self.tower)
        resolve_layer(self.select_layer, len(self.recipe.layers(self.tower)))  # fail early
        self.cache = PosCache()

    def forward(self, packed: PackedImages) -> PackedFeatures:
        tower, recipe = self.tower, self.recipe
        layers = recipe.layers(tower)
        stop = resolve_layer(self.select_layer, len(layers))
        with varlen_attention_impl(tower):
            emb = recipe.embed(tower, packed, self.cache)
            cu = emb.cu_seqlens.to(torch.int32)
            kwargs = {**hf_varlen_kwargs(cu), **emb.layer_kwargs}
            hidden = run_layers(layers[:stop], emb.hidden[None], kwargs)[0]
            pooled = None
            if self.select_layer == -1:
                norm = recipe.final_norm(tower)
                if norm is not None:
                    hidden = norm(hidden)
                pooled = recipe.pool(tower, hidden, cu)
        return PackedFeatures(hidden, cu, packed.grid_hw, emb.num_prefix, pooled)
