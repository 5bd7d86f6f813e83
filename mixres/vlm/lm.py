"""`CausalLM`, the built-in compact decoder-only LM: RMSNorm, RoPE, SwiGLU, GQA, optional tied embeddings.

It runs on packed sequences: all samples' tokens in one (T, D) tensor, segments given
by `cu_seqlens`, position ids restarting per sample, and causal varlen attention
(`mixres.attention.varlen_attention`), so nothing is padded and no sample sees another.

The layer stack is a plan of registered blocks chosen by the modality strategy:
    self   pre-norm causal self-attention + SwiGLU (joint_decoder)
    mot    the same with modality-specific norms, QKV, output and MLP weights, routed per
           token by a modality id through gather/scatter; one global attention (mot)
    xattn  Flamingo's gated cross-attention + gated MLP reading the sample's image
           tokens through varlen attention with separate q/k offsets (cross_attention)

`SeqContext` carries everything a block needs for one forward (offsets, RoPE tables,
modality routing, image memory, KV cache); the attention call lives there, so a block
does not know whether it runs a training batch, a decode step or a padded baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mixres.attention import varlen_attention
from mixres.packing import seqlens_to_cu
from mixres.vlm.registry import BLOCKS, register_block

__all__ = ["LMConfig", "CausalLM", "SeqContext", "KVCache", "LM_PRESETS"]


@dataclass
class LMConfig:
    vocab_size: int = 260
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp: int | None = None           # SwiGLU width; default 8/3 * hidden rounded up to 16
    rope_theta: float = 10000.0
    max_positions: int = 4096        # the longest sample (in LM positions) it accepts
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"LMConfig: hidden {self.hidden} must split into {self.heads} heads "
                             f"and heads into {self.kv_heads} kv groups")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"LMConfig: head dim {self.hidden // self.heads} must be even for RoPE")
        if self.mlp is None:
            self.mlp = -(-8 * self.hidden // 3 // 16) * 16

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LM_PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2),
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=4),
}


# helpers

def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope(x, cos, sin):
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _segment_owner(lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner segment, index inside the segment) of each token of packed segments."""
    owner = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    local = torch.arange(int(lens.sum()), device=lens.device) - torch.repeat_interleave(
        seqlens_to_cu(lens, device=lens.device)[:-1].long(), lens)
    return owner, local


class KVCache:
    """Keys and values of every cached layer, packed per sample like the queries.

    `plan(new_lens)` is called once per forward; each layer's `update` then merges the
    new tokens after each sample's old ones, so a decode step is one varlen call with
    len_q < len_k (bottom-right causal alignment).
    """

    def __init__(self, num_slots: int):
        self.k: list[torch.Tensor | None] = [None] * num_slots
        self.v: list[torch.Tensor | None] = [None] * num_slots
        self.lengths: torch.Tensor | None = None

    def plan(self, new_lens: torch.Tensor) -> None:
        old = self.lengths if self.lengths is not None else torch.zeros_like(new_lens)
        total = old + new_lens
        starts = seqlens_to_cu(total, device=new_lens.device)[:-1].long()
        o_owner, o_local = _segment_owner(old)
        n_owner, n_local = _segment_owner(new_lens)
        self._old_dst = starts[o_owner] + o_local
        self._new_dst = starts[n_owner] + old[n_owner] + n_local
        self._total = int(total.sum())
        self.cu_k = seqlens_to_cu(total, device=new_lens.device)
        self.max_k = int(total.max())
        self.lengths = total

    def update(self, slot: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[slot] is None:
            self.k[slot], self.v[slot] = k, v
        else:
            def merge(old, new):
                out = new.new_empty(self._total, *new.shape[1:])
                return out.index_copy(0, self._old_dst, old).index_copy(0, self._new_dst, new)
            self.k[slot], self.v[slot] = merge(self.k[slot], k), merge(self.v[slot], v)
        return self.k[slot], self.v[slot]


@dataclass
class SeqContext:
    """One forward's layout: the current tokens' offsets and positions, and what they read."""

    cu_q: torch.Tensor                       # (B+1,) offsets of the current tokens
    max_q: int
    positions: torch.Tensor                  # (T,) position ids of the current tokens
    cos: torch.Tensor = None                 # (T, head_dim) RoPE tables, filled by the decoder
    sin: torch.Tensor = None
    modality_ids: torch.Tensor | None = None  # (T,) 0 text, 1 image (mot)
    routes: list[torch.Tensor] = field(default_factory=list)  # token indices per modality
    memory: torch.Tensor | None = None       # (M, D) image tokens of all samples (xattn)
    memory_cu: torch.Tensor | None = None    # (B+1,) offsets of each sample's image tokens
    memory_max: int = 0
    cache: KVCache | None = None

    def attend(self, q, k, v, slot: int) -> torch.Tensor:
        """Causal self-attention of the current tokens (and the cached ones) within each sample."""
        cu_k, max_k = self.cu_q, self.max_q
        if self.cache is not None:
            k, v = self.cache.update(slot, k, v)
            cu_k, max_k = self.cache.cu_k, self.cache.max_k
        return varlen_attention(q, k, v, self.cu_q, cu_k, self.max_q, max_k, causal=True)

    def cross_attend(self, q, k, v) -> torch.Tensor:
        """Each sample's queries read only that sample's image tokens (no mask, no padding)."""
        return varlen_attention(q, k, v, self.cu_q, self.memory_cu, self.max_q, self.memory_max)


# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class QKV(nn.Module):
    """Grouped-query projections; returns q (T, H, d), k and v (T, H_kv, d) before RoPE."""

    def __init__(self, cfg: LMConfig, kv_dim: int | None = None):
        super().__init__()
        d = cfg.head_dim
        self.heads, self.kv_heads, self.d = cfg.heads, cfg.kv_heads, d
        self.q = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k = nn.Linear(kv_dim or cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v = nn.Linear(kv_dim or cfg.hidden, cfg.kv_heads * d, bias=False)

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return (self.q(x).unflatten(-1, (self.heads, self.d)),
                self.k(kv).unflatten(-1, (self.kv_heads, self.d)),
                self.v(kv).unflatten(-1, (self.kv_heads, self.d)))


@register_block("self")
class DecoderBlock(nn.Module):
    uses_cache = True

    def __init__(self, cfg: LMConfig, slot: int):
        super().__init__()
        self.slot = slot
        self.norm1, self.norm2 = RMSNorm(cfg.hidden, cfg.norm_eps), RMSNorm(cfg.hidden, cfg.norm_eps)
        self.qkv = QKV(cfg)
        self.o = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp)

    def forward(self, x, ctx: SeqContext):
        q, k, v = self.qkv(self.norm1(x))
        q, k = _rope(q, ctx.cos, ctx.sin), _rope(k, ctx.cos, ctx.sin)
        x = x + self.o(ctx.attend(q, k, v, self.slot).flatten(1))
        return x + self.mlp(self.norm2(x))


class _Expert(nn.Module):
    """One modality's weights of a mixture-of-transformers block."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.hidden, cfg.norm_eps), RMSNorm(cfg.hidden, cfg.norm_eps)
        self.qkv = QKV(cfg)
        self.o = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp)


def route_by_modality(experts, routes, x, fn):
    """fn(expert, tokens of its modality) for each modality (`routes`: the token indices of
    each), scattered back in place: gather/scatter, never position slices."""
    out = None
    for expert, idx in zip(experts, routes):
        if idx.numel() == 0:
            continue
        y = fn(expert, x[idx])
        if out is None:
            out = y.new_zeros(x.shape[0], *y.shape[1:])
        out = out.index_copy(0, idx, y)
    return out


@register_block("mot")
class MoTBlock(nn.Module):
    """Mixture-of-transformers (Liang et al. 2024): per-modality weights, shared attention.

    Tokens are gathered by modality (ctx.routes), projected by their modality's weights
    and scattered back, so the layout of text and image tokens can be anything.
    """

    uses_cache = True

    def __init__(self, cfg: LMConfig, slot: int, modalities: int = 2):
        super().__init__()
        self.slot = slot
        self.experts = nn.ModuleList(_Expert(cfg) for _ in range(modalities))
        self.cfg = cfg

    def _route(self, x, ctx, fn):
        return route_by_modality(self.experts, ctx.routes, x, fn)

    def forward(self, x, ctx: SeqContext):
        h, kv, d = self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim
        qkv = self._route(x, ctx, lambda e, t: torch.cat([p.flatten(1) for p in e.qkv(e.norm1(t))], -1))
        q, k, v = qkv.split([h * d, kv * d, kv * d], -1)
        q, k = q.unflatten(-1, (h, d)), k.unflatten(-1, (kv, d))
        q, k = _rope(q, ctx.cos, ctx.sin), _rope(k, ctx.cos, ctx.sin)
        a = ctx.attend(q, k, v.unflatten(-1, (kv, d)), self.slot).flatten(1)
        x = x + self._route(a, ctx, lambda e, t: e.o(t))
        return x + self._route(x, ctx, lambda e, t: e.mlp(e.norm2(t)))


@register_block("xattn")
class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated xattn-dense block: tanh-gated cross-attention to the sample's image
    tokens and a tanh-gated MLP. Gates start at `gate_init` (Flamingo: 0, so training
    starts from the text-only LM)."""

    uses_cache = False

    def __init__(self, cfg: LMConfig, slot: int, gate_init: float = 0.0):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.hidden, cfg.norm_eps), RMSNorm(cfg.hidden, cfg.norm_eps)
        self.qkv = QKV(cfg)
        self.o = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.mlp = SwiGLU(cfg.hidden, cfg.mlp)
        self.gate_attn = nn.Parameter(torch.tensor(float(gate_init)))
        self.gate_mlp = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x, ctx: SeqContext):
        # a sample without images reads nothing (varlen gives zeros for zero keys) but still
        # goes through the gated MLP, alone or in a batch
        if ctx.memory is not None and ctx.memory.shape[0]:
            q, k, v = self.qkv(self.norm1(x), ctx.memory)
            x = x + torch.tanh(self.gate_attn) * self.o(ctx.cross_attend(q, k, v).flatten(1))
        return x + torch.tanh(self.gate_mlp) * self.mlp(self.norm2(x))


# the model

class CausalLM(nn.Module):
    """Token embedding, a plan of blocks, final RMSNorm and the LM head (tied by option).

    plan: [(block name, kwargs), ...] from the strategy, e.g. [("self", {}), ("self", {})].
    """

    def __init__(self, cfg: LMConfig, plan: list[tuple[str, dict]] | None = None):
        super().__init__()
        self.cfg = cfg
        plan = plan or [("self", {})] * cfg.layers
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        blocks, slot = [], 0
        for name, kwargs in plan:
            cls = BLOCKS.get(name)
            blocks.append(cls(cfg, slot, **kwargs))
            slot += int(cls.uses_cache)
        self.blocks = nn.ModuleList(blocks)
        self.num_cache_slots = slot
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_positions(self) -> int:
        return self.cfg.max_positions

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h) if self.lm_head is not None else h @ self.embed_tokens.weight.t()

    def new_cache(self) -> KVCache:
        return KVCache(self.num_cache_slots)

    def run(self, x: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
        """(T, D) embeddings of packed samples -> (T, D) final hidden states (normed)."""
        pos = ctx.positions
        if pos.numel() and int(pos.max()) >= self.cfg.max_positions:
            raise ValueError(f"position {int(pos.max())} exceeds the decoder's max_positions "
                             f"{self.cfg.max_positions}; raise lm.max_positions or shorten samples")
        freqs = pos.to(self.inv_freq)[:, None] * self.inv_freq[None]
        emb = torch.cat((freqs, freqs), -1)
        ctx.cos, ctx.sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if ctx.modality_ids is not None and not ctx.routes:
            ctx.routes = [(ctx.modality_ids == m).nonzero().squeeze(1) for m in range(2)]
        if ctx.cache is not None:
            ctx.cache.plan((ctx.cu_q[1:] - ctx.cu_q[:-1]).long())
        for block in self.blocks:
            x = block(x, ctx)
        return self.norm(x)
