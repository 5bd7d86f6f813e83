"""Run timm and open_clip transformer blocks on one packed sequence, and pool it per image.

Only the attention call is reimplemented: each block's own norms, layer scales, drop paths
and MLP run as they are, and its attention module's own qkv / q_norm / k_norm / rope / norm /
gate / proj modules and flags (qkv_bias, qkv_bias_separate, scale, rotate_half, GQA heads)
compute q, k, v and the output. Only the softmax(q k^T) v step becomes
`mixres.attention.varlen_attention`, block-diagonal over `cu`, so every image attends to itself
alone. Block and attention classes are recognised by qualified name (no timm import here).

RoPE. timm rotates all but the first `num_prefix_tokens` tokens of a sequence. In a packed
sequence the prefixes of later images sit inside, so the recipes build the rope table full
length, with identity rows (sin 0, cos 1) at every prefix token: x * 1 + rot(x) * 0 == x exactly,
and one formula rotates every token.

Not reproduced in training mode: attention dropout and per-sample drop path (one pack is one
sample to DropPath); inference (eval) is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixres.attention import varlen_attention
from mixres.packing import local_positions

__all__ = ["run_blocks", "block_forward", "check_blocks", "drop_prefix", "pool_tokens",
           "latent_pool", "mha_pool", "identity_rope", "packed_rope"]


def _qualname(module) -> str:
    return type(module).__name__


def _lens(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


# attention modules: (N, D) -> (N, D)

def _rotate(q, k, v, rope, half: bool):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    if rope is None:
        return q, k
    rot = apply_rot_embed_cat
    return rot(q, rope, half=half).type_as(v), rot(k, rope, half=half).type_as(v)


def _timm_attention(attn, x, cu, max_len, rope):
    """timm.layers.Attention (ViT, DeiT, DINOv2 / SigLIP ports, NaFlexViT standard blocks)."""
    n = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).unbind(1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = varlen_attention(q, k, v, cu, cu, max_len, max_len, scale=attn.scale)
    o = attn.norm(o.reshape(n, attn.attn_dim))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def _eva_qkv(attn, x):
    n = x.shape[0]
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=bias)
        return qkv.reshape(n, 3, attn.num_heads, -1).unbind(1)
    return tuple(p(x).reshape(n, attn.num_heads, -1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))


def _eva_attention(attn, x, cu, max_len, rope):
    """timm.models.eva.EvaAttention (EVA, EVA-02, NaFlexViT 'eva' blocks)."""
    n, c = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _eva_qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rotate(q, k, v, rope, getattr(attn, "rotate_half", False))
    o = varlen_attention(q, k, v, cu, cu, max_len, max_len, scale=attn.scale)
    o = attn.norm(o.reshape(n, c))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def _rope_attention(attn, x, cu, max_len, rope):
    """timm.layers.AttentionRope (EVA 'rope' blocks, NaFlexViT with RoPE; GQA heads)."""
    n = x.shape[0]
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    if attn.qkv is not None:
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).unbind(1)
    else:
        q = attn.q_proj(x).reshape(n, attn.num_heads, attn.head_dim)
        k = attn.k_proj(x).reshape(n, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(x).reshape(n, attn.num_kv_heads, attn.head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rotate(q, k, v, rope, getattr(attn, "rotate_half", False))
    # kv head h // groups serves query head h, as timm's repeat_interleave
    o = varlen_attention(q, k, v, cu, cu, max_len, max_len, scale=attn.scale)
    o = attn.norm(o.reshape(n, attn.attn_dim))
    if gate is not None:
        o = o * gate
    return attn.proj_drop(attn.proj(o))


def _mha_projections(mha: nn.MultiheadAttention, q_in, kv_in):
    d = mha.embed_dim
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.split(d)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.split(d) if mha.in_proj_bias is not None else (None,) * 3
    return F.linear(q_in, wq, bq), F.linear(kv_in, wk, bk), F.linear(kv_in, wv, bv)


def _check_mha(mha: nn.MultiheadAttention) -> None:
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("packed backend: nn.MultiheadAttention with add_bias_kv / add_zero_attn is "
                         "not supported; use backend='grouped'")


def _mha_self(mha: nn.MultiheadAttention, x, cu, max_len, rope):
    """open_clip ResidualAttentionBlock's nn.MultiheadAttention (self-attention, no mask)."""
    n, d = x.shape
    h = mha.num_heads
    q, k, v = (t.reshape(n, h, d // h) for t in _mha_projections(mha, x, x))
    o = varlen_attention(q, k, v, cu, cu, max_len, max_len)
    return mha.out_proj(o.reshape(n, d))


_ATTENTION = {
    "Attention": _timm_attention,
    "EvaAttention": _eva_attention,
    "AttentionRope": _rope_attention,
    "MultiheadAttention": _mha_self,
}


def _attention(attn, x, cu, max_len, rope):
    fn = _ATTENTION.get(_qualname(attn))
    if fn is None or (fn is _timm_attention and not hasattr(attn, "qkv")):
        raise ValueError(f"packed backend: attention {type(attn).__module__}.{_qualname(attn)} is not "
                         f"supported; use backend='grouped'")
    return fn(attn, x, cu, max_len, rope)


# blocks: (N, D) -> (N, D)

def _vit_block(b, x, cu, m, rope):  # timm Block, open_clip ResidualAttentionBlock: pre-norm
    if _qualname(b) == "ResidualAttentionBlock":
        x = x + b.ls_1(_attention(b.attn, b.ln_1(x), cu, m, rope))
        return x + b.ls_2(b.mlp(b.ln_2(x)))
    x = x + b.drop_path1(b.ls1(_attention(b.attn, b.norm1(x), cu, m, rope)))
    return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def _res_post_block(b, x, cu, m, rope):  # timm ResPostBlock, EvaBlockPostNorm: post-norm
    x = x + b.drop_path1(b.norm1(_attention(b.attn, x, cu, m, rope)))
    return x + b.drop_path2(b.norm2(b.mlp(x)))


def _eva_block(b, x, cu, m, rope):
    a = _attention(b.attn, b.norm1(x), cu, m, rope)
    if b.gamma_1 is not None:
        a = b.gamma_1 * a
    x = x + b.drop_path1(a)
    y = b.mlp(b.norm2(x))
    if b.gamma_2 is not None:
        y = b.gamma_2 * y
    return x + b.drop_path2(y)


_BLOCKS = {
    "Block": _vit_block,
    "ResidualAttentionBlock": _vit_block,
    "ResPostBlock": _res_post_block,
    "EvaBlockPostNorm": _res_post_block,
    "EvaBlock": _eva_block,
}


def check_blocks(layers) -> None:
    """Fail at encoder construction, naming the block or attention mixres cannot run packed."""
    for blk in layers:
        if _qualname(blk) not in _BLOCKS:
            raise ValueError(f"packed backend: block {type(blk).__module__}.{_qualname(blk)} is not "
                             f"supported (timm Block/ResPostBlock/EvaBlock, open_clip "
                             f"ResidualAttentionBlock are); use backend='grouped'")
        attn = blk.attn
        if _qualname(attn) not in _ATTENTION:
            raise ValueError(f"packed backend: attention {type(attn).__module__}.{_qualname(attn)} "
                             f"is not supported; use backend='grouped'")
        if isinstance(attn, nn.MultiheadAttention):
            _check_mha(attn)
        if hasattr(blk, "ln_1_kv"):
            raise ValueError("packed backend: open_clip cross-attention blocks are not supported")


def block_forward(block, x, cu, max_len, rope=None):
    return _BLOCKS[_qualname(block)](block, x, cu, max_len, rope)


def run_blocks(layers, hidden: torch.Tensor, cu: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """`Recipe.run`: hidden (1, N, D) through timm / open_clip blocks, block-diagonal over cu.

    layer_kwargs: "rope" (N, 2*head_dim) for every layer, or "rope_layers" (depth, N, H,
    2*head_dim) one per layer (timm's mixed RoPE); both in packed order with identity rows
    at prefix tokens.
    """
    cu = cu.to(torch.int32)
    m = _lens(cu)
    x = hidden[0]
    rope, per_layer = layer_kwargs.get("rope"), layer_kwargs.get("rope_layers")
    for i, blk in enumerate(layers):
        r = per_layer[i] if per_layer is not None else rope
        x = block_forward(blk, x, cu, m, r)
    return x[None]


# rope tables in packed order

def identity_rope(prefix: int, like: torch.Tensor) -> torch.Tensor:
    """(..., prefix, 2d) rows that leave a token unrotated: sin 0 then cos 1 (timm's cat layout)."""
    half = like.shape[-1] // 2
    shape = (*like.shape[:-2], prefix, half)
    return torch.cat([like.new_zeros(shape), like.new_ones(shape)], -1)


def packed_rope(per_image: list[torch.Tensor], prefix: int) -> torch.Tensor:
    """Per-image tables (..., n_i, 2d) -> (..., sum(prefix + n_i), 2d), prefix rows identity."""
    parts = []
    for t in per_image:
        if prefix:
            parts.append(identity_rope(prefix, t))
        parts.append(t)
    return torch.cat(parts, dim=-2)


# pooling per image

def drop_prefix(tokens: torch.Tensor, cu: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's tokens after its first `prefix`, and their offsets."""
    if prefix == 0:
        return tokens, cu
    keep = local_positions(cu) >= prefix
    lens = (cu[1:] - cu[:-1]) - prefix
    return tokens[keep], torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(cu.dtype)


def pool_tokens(tokens: torch.Tensor, cu: torch.Tensor, how: str, prefix: int,
                include_prefix: bool = False) -> torch.Tensor | None:
    """timm's global_pool_nlc per image: 'token' (first), 'avg', 'max', 'avgmax'; '' -> None."""
    if not how:
        return None
    if how == "token":
        return tokens[cu[:-1].long()]
    if not include_prefix:
        tokens, cu = drop_prefix(tokens, cu, prefix)
    bounds = cu.tolist()
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        x = tokens[s:e][None]
        if how == "avg":
            x = x.mean(dim=1)
        elif how == "max":
            x = x.amax(dim=1)
        elif how == "avgmax":
            x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
        else:
            raise ValueError(f"packed backend: global pool {how!r} is not supported")
        out.append(x[0])
    return torch.stack(out)


def latent_pool(pool, tokens: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """timm AttentionPoolLatent ('map' pooling) with each image's latent queries as one varlen set."""
    if _qualname(pool) != "AttentionPoolLatent":
        raise ValueError(f"packed backend: attention pool {_qualname(pool)} is not supported; "
                         f"use backend='grouped'")
    if pool.pos_embed is not None:
        raise ValueError("packed backend: AttentionPoolLatent with a fixed-size pos_embed needs every "
                         "image at its native size; use backend='grouped'")
    b, L, h, hd = cu.numel() - 1, pool.latent_len, pool.num_heads, pool.head_dim
    q = pool.q(pool.latent)[0].reshape(L, h, hd)
    k, v = pool.kv(tokens).reshape(-1, 2, h, hd).unbind(1)
    q, k = pool.q_norm(q), pool.k_norm(k)
    q = q.expand(b, L, h, hd).reshape(b * L, h, hd)
    cu_q = torch.arange(b + 1, device=tokens.device, dtype=torch.int32) * L
    o = varlen_attention(q, k, v, cu_q, cu.to(torch.int32), L, _lens(cu), scale=pool.scale)
    x = pool.proj_drop(pool.proj(o.reshape(b, L, tokens.shape[-1])))
    if pool.mlp is not None:
        x = x + pool.mlp(pool.norm(x))
    if pool.pool == "token":
        return x[:, 0]
    if pool.pool == "avg":
        return x.mean(1)
    return x


def mha_pool(mha: nn.MultiheadAttention, queries: torch.Tensor, tokens: torch.Tensor,
             cu: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention(queries, image tokens) for every image: (B, nq, d) (open_clip's
    AttentionalPooler; the same `queries` (nq, d) for each image)."""
    _check_mha(mha)
    b, nq, d, h = cu.numel() - 1, queries.shape[0], mha.embed_dim, mha.num_heads
    q, k, v = _mha_projections(mha, queries, tokens)
    q = q.reshape(1, nq, h, d // h).expand(b, nq, h, d // h).reshape(b * nq, h, d // h)
    k, v = k.reshape(-1, h, d // h), v.reshape(-1, h, d // h)
    cu_q = torch.arange(b + 1, device=tokens.device, dtype=torch.int32) * nq
    o = varlen_attention(q, k, v, cu_q, cu.to(torch.int32), nq, _lens(cu))
    return mha.out_proj(o.reshape(b * nq, d)).reshape(b, nq, d)
