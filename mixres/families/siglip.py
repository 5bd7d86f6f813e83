"""SigLIP: conv patches, no prefix, post-layernorm, attention-pooling head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixres.attention import varlen_attention
from mixres.families import Embedded, FamilySpec, Recipe, register_family
from mixres.families.common import conv_patches, patch_call
from mixres.families.spec import IMAGENET_STANDARD
from mixres.packing import resample_table


def attention_pool(tower, tokens, cu):
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


def embed(tower, packed, cache) -> Embedded:
    emb = tower.embeddings
    x = conv_patches(packed, emb.patch_embedding)
    table = emb.position_embedding.weight
    pos = cache.per_grid(table, "siglip", packed, lambda g: resample_table(table, g))
    return Embedded(x + pos, packed.cu_seqlens)


RECIPE = Recipe(embed=embed, layers=lambda t: t.encoder.layers, final_norm=lambda t: t.post_layernorm,
                pool=attention_pool)

SPEC = register_family(FamilySpec("siglip", IMAGENET_STANDARD, call=patch_call(), recipe=RECIPE))
