"""One Mixture-of-Transformers layer over a pair of Llama-shaped HF decoder layers.

experts = (the LM's own layer, its image expert: a copy with its own weights). The layer
is the HF layer's computation (pre-norm attention with RoPE, then pre-norm MLP, both
residual), with every weight-bearing step done by the token's modality expert: tokens
are gathered by modality id (`ctx.routes`), put through that expert's module, and
scattered back, so text and image tokens may lie anywhere in the sequence. Attention
itself is one causal varlen call over the packed sequence (every sample's text and
image tokens together), with the LM's head layout and scaling.

The HF modules are called, never changed: `input_layernorm`, `self_attn.{q,k,v,o}_proj`,
`post_attention_layernorm`, `mlp` of each expert.
"""

from __future__ import annotations

import torch

from mixres.attention import varlen_attention
from mixres.vlm.lm import route_by_modality

__all__ = ["mot_layer"]


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)



def mot_layer(experts, x: torch.Tensor, ctx, position_embeddings, cache, slot: int, kw: dict):
    """(T, D) -> (T, D) through one MoT layer; `kw` holds the varlen offsets (q and k)."""
    attn = experts[0].self_attn
    d = attn.head_dim
    nq = attn.config.num_attention_heads
    nkv = attn.config.num_key_value_heads

    def qkv(e, t):
        n = e.input_layernorm(t)
        a = e.self_attn
        return torch.cat([a.q_proj(n), a.k_proj(n), a.v_proj(n)], -1)

    q, k, v = route_by_modality(experts, ctx.routes, x, qkv).split([nq * d, nkv * d, nkv * d], -1)
    q, k, v = q.unflatten(-1, (nq, d)), k.unflatten(-1, (nkv, d)), v.unflatten(-1, (nkv, d))
    cos, sin = (t[0][:, None].to(q.dtype) for t in position_embeddings)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    if cache is not None:
        k, v = cache.update(slot, k, v)
    o = varlen_attention(q, k, v, kw["cu_seq_lens_q"], kw["cu_seq_lens_k"], kw["max_length_q"],
                         kw["max_length_k"], causal=True, scale=attn.scaling)
    x = x + route_by_modality(experts, ctx.routes, o.flatten(1), lambda e, t: e.self_attn.o_proj(t))
    return x + route_by_modality(experts, ctx.routes, x, lambda e, t: e.mlp(e.post_attention_layernorm(t)))
