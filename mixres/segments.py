"""How the SDPA backend lays packed segments out for dense attention calls.

A `SegmentPlan` is built once per set of offsets and shared by every layer that attends
over them (the plans of the last few offset tensors are kept), so the Python work per
image is done once per batch, not once per layer:

    groups   segments of equal (len_q, len_k) stacked into one (G, heads, L, d) SDPA call:
             a view where they lie back to back (the encoder orders a batch's images by
             length for this), else through an index tensor built once; equal-size images
             cost what a dense batch costs
    windows  short segments (<= C/2 tokens each) through overlapping windows of C tokens
             every C/2 tokens (stretched by < C/2 so the last ends at the last token),
             strided views of q/k/v (no copy), one SDPA call over all windows with a
             block-diagonal mask; every short
             segment lies whole in some window, which gives its output rows. Many tiny
             images (rendered words, thumbnails) with many distinct lengths cost one call
             instead of one call and three gathers per length, at the price of attending
             over C keys (the attention of a tiny segment is a few % of its layer's work)

Every piece writes its output rows straight into their tokens' rows. On the CPU every
segment runs as groups (the windows lost every measurement there, and a fixed choice keeps
two processes' results bit for bit equal). Elsewhere whether short segments run through
windows of C tokens or as groups is chosen by measurement: the first batch of each kind
(device, dtype, heads, head size, how many short segments and how long, bucketed by powers
of two) times every candidate on its own data and keeps the fastest.
Every candidate computes the same attention (masked keys contribute exact zeros), so the
choice changes speed, not results beyond float rounding order.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SegmentPlan", "segment_plan", "run_plan", "force_layout", "WINDOW_SIZES"]

WINDOW_SIZES = (32, 64, 128)  # window lengths C tried; segments of <= C/2 tokens go through them
_PLANS: OrderedDict = OrderedDict()
_MAX_PLANS = 8
_TUNED: dict[tuple, int] = {}  # kind of batch -> window length that measured fastest (0: groups)
_FORCED: list[int] = []


@contextlib.contextmanager
def force_layout(size: int):
    """Inside the block, short segments run through windows of `size` tokens (0: as groups)
    wherever a plan has them, instead of the measured choice (tests, benchmarks)."""
    if size and size not in WINDOW_SIZES:
        raise ValueError(f"force_layout({size}): choose 0 or one of {WINDOW_SIZES}")
    _FORCED.append(size)
    try:
        yield
    finally:
        _FORCED.pop()


@dataclass(frozen=True)
class Group:
    """Segments of one (lq, lk): indices (G, lq) / (G, lk) into the packed tokens, or the
    start of the one segment (a view, no copy)."""
    lq: int
    lk: int
    q: torch.Tensor | int
    k: torch.Tensor | int
    tokens: torch.Tensor  # (G * lq,) the query tokens its output rows belong to
    count: int            # G, the segments in the group


@dataclass(frozen=True)
class Windows:
    """Overlapping windows of `size` tokens every `stride` over the whole sequence (the last
    ends at the last token), their block-diagonal masks, and for each token of a short
    segment which window row holds its output."""
    size: int
    stride: int
    count: int
    mask: torch.Tensor       # (count, 1, size, size) bool
    window: torch.Tensor     # (R,) the window of each short token
    row: torch.Tensor        # (R,) its row in that window
    tokens: torch.Tensor     # (R,) the short tokens
    long: tuple[Group, ...]  # the segments longer than size/2, as groups


@dataclass(frozen=True)
class SegmentPlan:
    total_q: int
    groups: tuple[Group, ...]       # every segment as groups (layout 0)
    windows: dict[int, Windows]     # window length -> the windowed layout
    key: tuple                      # the kind of batch, for the measured choice


def _index(starts: list[int], length: int, device) -> torch.Tensor | int:
    """The segments' token indices (G, length), or the first start where they lie back to
    back (one segment, or a run of equal lengths: the packer orders images by length so
    that every length is one run), which `_Rows.take` reads as a view."""
    if all(b - a == length for a, b in zip(starts, starts[1:])):
        return starts[0]
    s = torch.tensor(starts, device=device, dtype=torch.long)
    return s[:, None] + torch.arange(length, device=device)[None]


def _tokens(starts: list[int], length: int, device) -> torch.Tensor:
    s = torch.tensor(starts, device=device, dtype=torch.long)
    return (s[:, None] + torch.arange(length, device=device)[None]).flatten()


def _windows(size: int, total: int, segs: list[tuple[int, int]], groups, device) -> Windows | None:
    """Windows every size/2 tokens for the self-attention segments (start, length) of <= size/2,
    each window stretched by less than size/2 so that the last one ends at the last token."""
    half = size // 2
    short = [(st, n) for st, n in segs if n <= half]
    if len(short) < 2 or total < size:
        return None
    size += (total - size) % half
    count = (total - size) // half + 1
    seg_id = torch.empty(total, dtype=torch.long)
    for i, (st, n) in enumerate(segs):
        seg_id[st:st + n] = i
    ids = seg_id.unfold(0, size, half)  # (count, size)
    mask = (ids[:, :, None] == ids[:, None, :])[:, None]
    window, row, tokens = [], [], []
    for st, n in short:
        w = min(st // half, count - 1)  # starts at most half before it, and n <= half: it fits
        window.append(torch.full((n,), w))
        row.append(torch.arange(st - w * half, st - w * half + n))
        tokens.append(torch.arange(st, st + n))
    long = tuple(g for g in groups if g.lq > half)
    return Windows(size, half, count, mask.to(device), torch.cat(window).to(device),
                   torch.cat(row).to(device), torch.cat(tokens).to(device), long)


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
    groups = []
    for (lq, lk), seg in by_len.items():
        sq, sk = [starts_q[i] for i in seg], [starts_k[i] for i in seg]
        groups.append(Group(lq, lk, _index(sq, lq, dev), _index(sk, lk, dev) if lk else 0,
                            _tokens(sq, lq, dev), len(seg)))
    n = sum(1 for x in lens_q if x)
    key = (dev.type, q.dtype, q.shape[1], k.shape[1], q.shape[-1], n.bit_length(),
           (total_q // max(n, 1)).bit_length(), len(groups).bit_length())
    windows = {}
    # windows hold self-attention (each query sees the keys of its own tokens); only the
    # measured choice is built once this kind of batch has one (and every size under
    # force_layout, or before the measurement). On the CPU they are not candidates: groups
    # won every measurement there (96 images of 1-16 tokens: 1.9 ms vs 3.5 / 3.6 / 6.3 ms at
    # 6 heads), and a timed choice could differ between two processes, so a resumed
    # `mixres embed` run would differ from an uninterrupted one in the last bits
    if _FORCED:
        sizes = WINDOW_SIZES
    elif dev.type == "cpu":
        sizes = []
    else:
        sizes = WINDOW_SIZES if key not in _TUNED else [_TUNED[key]] if _TUNED[key] else []
    if sizes and not causal and starts_q == starts_k and lens_q == lens_k and len(groups) > 1:
        segs = [(st, n) for st, n in zip(starts_q, lens_q) if n > 0]
        for size in sizes:
            if (w := _windows(size, total_q, segs, groups, dev)) is not None:
                windows[size] = w
    return SegmentPlan(total_q, tuple(groups), windows, key)


def _state(cu: torch.Tensor) -> int | torch.Tensor:
    return cu.clone() if cu.is_inference() else cu._version


def _unchanged(cu: torch.Tensor, state: int | torch.Tensor) -> bool:
    return torch.equal(cu, state) if isinstance(state, torch.Tensor) else cu._version == state


def segment_plan(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool, q: torch.Tensor,
                 k: torch.Tensor) -> SegmentPlan:
    """The plan for these offsets: built on first sight of the offset tensors, then reused
    while they are the same tensors with the same contents (every layer of a forward)."""
    # the same offset tensors with the same contents: a normal tensor's version counter says
    # so, an inference tensor (none) is compared with a copy taken at build time (a tiny
    # compare; `tensor_stamp` would sum it in float64, ~0.1 ms, and this runs every layer)
    shape = (causal, q.shape, k.shape, q.dtype, q.device)
    key = (id(cu_q), id(cu_k))
    hit = _PLANS.get(key)
    if (hit is not None and hit[0] is cu_q and hit[1] is cu_k and hit[2] == shape
            and _unchanged(cu_q, hit[3]) and (cu_k is cu_q or _unchanged(cu_k, hit[4]))):
        _PLANS.move_to_end(key)
        return hit[5]
    plan = _build(cu_q, cu_k, causal, q, k)
    # holding the tensors keeps their ids unique
    state_q = _state(cu_q)  # self-attention passes one tensor twice: one state, one compare
    _PLANS[key] = (cu_q, cu_k, shape, state_q, state_q if cu_k is cu_q else _state(cu_k), plan)
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


# running a plan

class _Rows:
    """(T, heads, d) `t` read as groups of segments: its strides and offset taken once per call
    (per layer), so a run of segments is one `as_strided`, no other dispatch: over many tiny
    images the Python per group is a visible share of the attention (1-16 tokens: 16 groups a
    layer, ~200 a forward)."""

    __slots__ = ("t", "s0", "s1", "s2", "h", "d", "off")

    def __init__(self, t: torch.Tensor):
        self.t = t
        (self.s0, self.s1, self.s2), (_, self.h, self.d) = t.stride(), t.shape
        self.off = t.storage_offset()

    def take(self, index: torch.Tensor | int, length: int, count: int) -> torch.Tensor:
        """(count, heads, length, d): for a run of segments starting at token `index` one
        strided view, else a gather through the index tensor (count, length)."""
        if isinstance(index, int):
            s0 = self.s0
            return self.t.as_strided((count, self.h, length, self.d), (length * s0, self.s1, s0, self.s2),
                                     self.off + index * s0)
        return self.t[index].transpose(1, 2)


def _run_group(g: Group, q: _Rows, k: _Rows, v: _Rows, causal, scale, gqa, out: _Rows) -> None:
    """The group's attention, written into its query tokens' rows of `out`."""
    if g.lk == 0:  # no keys to attend to: the output is zero
        out.t[g.tokens] = 0
        return
    n = g.count
    qg, kg, vg = q.take(g.q, g.lq, n), k.take(g.k, g.lk, n), v.take(g.k, g.lk, n)
    if causal and g.lq != g.lk:  # bottom-right aligned: query i sees keys j <= i + (lk - lq)
        i = torch.arange(g.lq, device=qg.device)[:, None]
        mask = torch.arange(g.lk, device=qg.device)[None] <= i + (g.lk - g.lq)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale, enable_gqa=gqa)
    if isinstance(g.q, int):  # a run of segments: a strided copy straight into its rows
        out.take(g.q, g.lq, n).copy_(o)
    else:
        o = o.transpose(1, 2)  # (G, lq, heads, d_v)
        out.t[g.tokens] = o.reshape(-1, o.shape[2], o.shape[3]).to(out.t.dtype)  # autocast: SDPA gave bf16


def _run_windows(w: Windows, q, k, v, scale, gqa) -> torch.Tensor:
    """(R, heads, d_v) outputs of the short tokens, windows over strided views of q/k/v."""
    def view(t):  # (count, heads, size, d) windows of (T, heads, d), whatever its strides: no copy
        (s0, s1, s2), (h, d) = t.stride(), t.shape[1:]
        return t.as_strided((w.count, h, w.size, d), (w.stride * s0, s1, s0, s2), t.storage_offset())

    o = F.scaled_dot_product_attention(view(q), view(k), view(v), attn_mask=w.mask, scale=scale,
                                       enable_gqa=gqa)
    return o.transpose(1, 2)[w.window, w.row]  # (windows, size, heads, d_v) -> the short tokens'


def _run(plan: SegmentPlan, size: int, q, k, v, causal, scale) -> torch.Tensor:
    # every piece writes its rows straight into the output: one copy per piece, no cat
    gqa = q.shape[1] != k.shape[1]
    out = q.new_empty(plan.total_q, q.shape[1], v.shape[-1])
    rows = _Rows(q), _Rows(k), _Rows(v)
    out_rows = _Rows(out)
    for g in plan.windows[size].long if size else plan.groups:
        _run_group(g, *rows, causal, scale, gqa, out_rows)
    if size:
        out[plan.windows[size].tokens] = _run_windows(plan.windows[size], q, k, v, scale, gqa).to(out.dtype)
    return out


def _timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return time.perf_counter() - t0, out


def run_plan(plan: SegmentPlan, q, k, v, causal: bool, scale, layout: int | None = None) -> torch.Tensor:
    """Attention over the plan's segments. layout: 0 every length its own grouped call, C short
    segments through windows of C tokens (one of `plan.windows`), None what measured fastest
    for this kind of batch."""
    if layout is not None:
        if layout and layout not in plan.windows:
            raise ValueError(f"layout {layout}: this plan has windows of {sorted(plan.windows)} tokens")
        return _run(plan, layout, q, k, v, causal, scale)
    if _FORCED:
        return _run(plan, _FORCED[-1] if _FORCED[-1] in plan.windows else 0, q, k, v, causal, scale)
    if not plan.windows or q.device.type == "cpu":  # the CPU: groups (see `_build`)
        return _run(plan, 0, q, k, v, causal, scale)
    size = _TUNED.get(plan.key)
    if size is not None:  # a batch of the same kind may lack the windows that won (too short)
        return _run(plan, size if size in plan.windows else 0, q, k, v, causal, scale)
    best, out = math.inf, None
    for _ in range(2):  # the first round pays for allocation; keep each candidate's best
        for cand in (0, *plan.windows):
            seconds, o = _timed(lambda c=cand: _run(plan, c, q, k, v, causal, scale))
            if seconds < best:
                best, size, out = seconds, cand, o
    _TUNED[plan.key] = size
    return out
