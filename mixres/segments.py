"""How the SDPA backend lays packed segments out for dense attention calls.

A `SegmentPlan` is built once per set of offsets and shared by every layer that attends
over them (the plans of the last few offset tensors are kept), so the Python work per
image is done once per batch, not once per layer:

    groups   segments of equal (len_q, len_k) stacked into one (G, heads, L, d) SDPA call
             through an index tensor built once (a view for a segment whose length is
             unique); equal-size images cost what a dense batch costs
    blocks   short segments (<= SHORT tokens each) laid side by side in chunks of C
             tokens, one SDPA call over all chunks with a block-diagonal mask: many tiny
             images (rendered words, thumbnails) with many distinct lengths in one call
             instead of one call per length, at the price of attending over C keys

One gather (`source`) puts every piece's output rows back in token order. Whether the
short segments run as blocks of C tokens or as groups is chosen by measurement: the first
batch of each kind (device, dtype, heads, head size, how many short segments and how long,
bucketed by powers of two) times every candidate on its own data and keeps the fastest.
Every candidate computes the same attention (masked keys contribute exact zeros), so the
choice changes speed, not results beyond float rounding order.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mixres.packing import tensor_stamp

__all__ = ["SegmentPlan", "segment_plan", "run_plan", "SHORT", "BLOCK_SIZES"]

SHORT = 64                 # a segment this short may share a block with others
BLOCK_SIZES = (64, 128, 256)  # chunk lengths tried for the blocks
_PLANS: OrderedDict = OrderedDict()
_MAX_PLANS = 8
_TUNED: dict[tuple, int] = {}  # kind of batch -> block size that measured fastest (0: groups)


@dataclass(frozen=True)
class Group:
    """Segments of one (lq, lk): indices (G, lq) / (G, lk) into the packed tokens, or the
    start of the one segment (a view, no copy)."""
    lq: int
    lk: int
    q: torch.Tensor | int
    k: torch.Tensor | int
    tokens: torch.Tensor  # (G * lq,) the query tokens its output rows belong to


@dataclass(frozen=True)
class Blocks:
    """Short self-attention segments in `chunks` chunks of `size` slots: token index per slot
    (padding slots repeat token 0), the block-diagonal mask, and the real slots' tokens."""
    size: int
    index: torch.Tensor   # (chunks * size,)
    mask: torch.Tensor    # (chunks, 1, size, size) bool
    real: torch.Tensor    # (R,) slots holding a real token
    tokens: torch.Tensor  # (R,) which token each real slot holds


@dataclass(frozen=True)
class SegmentPlan:
    total_q: int
    long: tuple[Group, ...]             # groups that always run as groups
    short: tuple[Group, ...]            # groups of short segments (the grouped candidate)
    blocks: dict[int, Blocks]           # block size -> the blocked candidate
    key: tuple                          # the kind of batch, for the measured choice
    sources: dict = field(default_factory=dict)  # candidate -> `_source` of its output rows


def _index(starts: list[int], length: int, device) -> torch.Tensor | int:
    if len(starts) == 1:
        return starts[0]
    s = torch.tensor(starts, device=device, dtype=torch.long)
    return s[:, None] + torch.arange(length, device=device)[None]


def _tokens(starts: list[int], length: int, device) -> torch.Tensor:
    s = torch.tensor(starts, device=device, dtype=torch.long)
    return (s[:, None] + torch.arange(length, device=device)[None]).flatten()


def _blocks(segs: list[tuple[int, int]], size: int, device) -> Blocks:
    """Greedy: segments (start, length) in token order fill chunks of `size` slots."""
    chunks: list[list[tuple[int, int]]] = [[]]
    used = 0
    for start, n in segs:
        if used + n > size:
            chunks.append([])
            used = 0
        chunks[-1].append((start, n))
        used += n
    index = torch.zeros(len(chunks), size, dtype=torch.long)
    seg_id = torch.arange(-1, -size - 1, -1).repeat(len(chunks), 1)  # padding: a segment each
    real, tokens, sid = [], [], 0
    for c, chunk in enumerate(chunks):
        at = 0
        for start, n in chunk:
            index[c, at:at + n] = torch.arange(start, start + n)
            seg_id[c, at:at + n] = sid
            real.append(torch.arange(c * size + at, c * size + at + n))
            tokens.append(torch.arange(start, start + n))
            sid, at = sid + 1, at + n
    mask = seg_id[:, :, None] == seg_id[:, None, :]
    return Blocks(size, index.flatten().to(device), mask[:, None].to(device), torch.cat(real).to(device),
                  torch.cat(tokens).to(device))


def _build(cu_q, cu_k, causal: bool, q: torch.Tensor, k: torch.Tensor) -> SegmentPlan:
    lens_q, lens_k = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    starts_q, starts_k = cu_q[:-1].tolist(), cu_k[:-1].tolist()
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    if total_q != q.shape[0] or total_k != k.shape[0]:
        raise ValueError(f"varlen_attention: offsets cover {total_q} queries / {total_k} keys, "
                         f"the tensors hold {q.shape[0]} / {k.shape[0]}")
    by_len: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(zip(lens_q, lens_k)):
        if key[0] > 0:
            by_len.setdefault(key, []).append(i)
    dev = q.device
    long, short, short_segs = [], [], []
    for (lq, lk), seg in by_len.items():
        sq, sk = [starts_q[i] for i in seg], [starts_k[i] for i in seg]
        group = Group(lq, lk, _index(sq, lq, dev), _index(sk, lk, dev) if lk else 0, _tokens(sq, lq, dev))
        # blocks hold self-attention segments (a query sees the keys of its own slots)
        is_short = not causal and lq == lk and lq <= SHORT and sq == sk
        (short if is_short else long).append(group)
        if is_short:
            short_segs += [(s, lq) for s in sq]
    short_segs.sort()
    longest = max((n for _, n in short_segs), default=0)
    blocks = {}
    if len(short) > 1:  # one length: a single grouped call already, nothing to gain
        blocks = {size: _blocks(short_segs, size, dev) for size in BLOCK_SIZES if size >= longest}
    n_short = len(short_segs)
    mean = sum(n for _, n in short_segs) / max(n_short, 1)
    key = (dev.type, q.dtype, q.shape[1], q.shape[-1], total_k == total_q,
           n_short.bit_length(), int(mean).bit_length(), len(short).bit_length())
    return SegmentPlan(total_q, tuple(long), tuple(short), blocks, key)


def segment_plan(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool, q: torch.Tensor,
                 k: torch.Tensor) -> SegmentPlan:
    """The plan for these offsets: built on first sight of the offset tensors, then reused
    while they are the same tensors with the same contents (every layer of a forward)."""
    stamp = (tensor_stamp(cu_q), tensor_stamp(cu_k), causal, q.shape, k.shape, q.dtype, q.device)
    hit = _PLANS.get((id(cu_q), id(cu_k)))
    if hit is not None and hit[0] is cu_q and hit[1] is cu_k and hit[2] == stamp:
        _PLANS.move_to_end((id(cu_q), id(cu_k)))
        return hit[3]
    plan = _build(cu_q, cu_k, causal, q, k)
    _PLANS[(id(cu_q), id(cu_k))] = (cu_q, cu_k, stamp, plan)  # holding them keeps their ids unique
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


# running a plan

def _take(t: torch.Tensor, index: torch.Tensor | int, length: int) -> torch.Tensor:
    """(G, heads, length, d) rows of `t` (T, heads, d)."""
    if isinstance(index, int):
        return t[index:index + length].transpose(0, 1)[None]
    return t[index].transpose(1, 2)


def _run_group(g: Group, q, k, v, causal, scale, gqa) -> torch.Tensor:
    if g.lk == 0:  # no keys to attend to: the output is zero
        n = g.tokens.numel()
        return q.new_zeros(n, q.shape[1], v.shape[-1])
    qg, kg, vg = _take(q, g.q, g.lq), _take(k, g.k, g.lk), _take(v, g.k, g.lk)
    if causal and g.lq != g.lk:  # bottom-right aligned: query i sees keys j <= i + (lk - lq)
        i = torch.arange(g.lq, device=q.device)[:, None]
        mask = torch.arange(g.lk, device=q.device)[None] <= i + (g.lk - g.lq)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2).reshape(-1, q.shape[1], v.shape[-1])


def _run_blocks(b: Blocks, q, k, v, scale, gqa) -> torch.Tensor:
    chunks = b.mask.shape[0]

    def take(t):
        return t.index_select(0, b.index).view(chunks, b.size, t.shape[1], t.shape[2]).transpose(1, 2)

    o = F.scaled_dot_product_attention(take(q), take(k), take(v), attn_mask=b.mask, scale=scale,
                                       enable_gqa=gqa)
    return o.transpose(1, 2).reshape(-1, q.shape[1], v.shape[-1]).index_select(0, b.real)


def _source(tokens: list[torch.Tensor]) -> torch.Tensor | None:
    """Which output row each token takes, when the pieces' rows are concatenated in order;
    None when that order is already token order."""
    t = torch.cat(tokens) if len(tokens) > 1 else tokens[0]
    source = torch.empty_like(t)
    source[t] = torch.arange(t.numel(), device=t.device)
    return None if bool((source[1:] > source[:-1]).all()) else source


def _run(plan: SegmentPlan, size: int, q, k, v, causal, scale) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    groups = plan.long if size else plan.long + plan.short
    rows = [_run_group(g, q, k, v, causal, scale, gqa) for g in groups]
    tokens = [g.tokens for g in groups]
    if size:
        rows.append(_run_blocks(plan.blocks[size], q, k, v, scale, gqa))
        tokens.append(plan.blocks[size].tokens)
    if not rows:
        return q.new_zeros(plan.total_q, q.shape[1], v.shape[-1])
    if size not in plan.sources:  # once per plan and candidate
        plan.sources[size] = _source(tokens)
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    source = plan.sources[size]
    return out if source is None else out.index_select(0, source)


def _timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return time.perf_counter() - t0, out


def run_plan(plan: SegmentPlan, q, k, v, causal: bool, scale, layout: int | None = None) -> torch.Tensor:
    """Attention over the plan's segments. layout: 0 every length its own grouped call, C short
    segments in blocks of C tokens (one of `plan.blocks`), None what measured fastest for this
    kind of batch."""
    if layout is not None:
        if layout and layout not in plan.blocks:
            raise ValueError(f"layout {layout}: this plan has blocks of {sorted(plan.blocks)} tokens")
        return _run(plan, layout, q, k, v, causal, scale)
    if not plan.blocks:
        return _run(plan, 0, q, k, v, causal, scale)
    size = _TUNED.get(plan.key)
    if size is not None:
        return _run(plan, size, q, k, v, causal, scale)
    best, out = math.inf, None
    for _ in range(2):  # the first round pays for allocation; keep each candidate's best
        for cand in (0, *plan.blocks):
            seconds, o = _timed(lambda c=cand: _run(plan, c, q, k, v, causal, scale))
            if seconds < best:
                best, size, out = seconds, cand, o
    _TUNED[plan.key] = size
    return out
