"""varlen_attention == plain per-segment softmax attention, for every backend here."""

import math

import pytest
import torch

from mixres.attention import available_backends, use_backend, varlen_attention
from mixres.packing import seqlens_to_cu


def reference(q, k, v, cu_q, cu_k, causal, scale):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for i in range(cu_q.numel() - 1):
        a, b = int(cu_q[i]), int(cu_q[i + 1])
        c, d = int(cu_k[i]), int(cu_k[i + 1])
        if b == a or d == c:
            continue
        qi = q[a:b].double().transpose(0, 1)
        ki = k[c:d].double().repeat_interleave(rep, 1).transpose(0, 1)
        vi = v[c:d].double().repeat_interleave(rep, 1).transpose(0, 1)
        s = qi @ ki.transpose(1, 2) * (scale or 1 / math.sqrt(q.shape[-1]))
        if causal:
            lq, lk = b - a, d - c
            allowed = torch.arange(lk)[None] <= torch.arange(lq)[:, None] + (lk - lq)
            s = s.masked_fill(~allowed, float("-inf"))
        out[a:b] = (s.softmax(-1) @ vi).transpose(0, 1)
    return out


CASES = [
    ([5, 7, 5, 1, 12], None),        # self-attention, repeated lengths
    ([3, 1, 4], [6, 2, 9]),          # separate q/k offsets (cross-attention, pooling)
    ([1, 1, 1], [10, 3, 7]),         # one query per segment (attention pooling)
    ([4, 0, 3], [4, 0, 3]),          # an empty segment
]


@pytest.mark.parametrize("backend", available_backends(torch.zeros(1, 1, 1)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q,lens_k", CASES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_backend_matches_reference(backend, causal, lens_q, lens_k, heads):
    lens_k = lens_k or lens_q
    hq, hk = heads
    cu_q, cu_k = seqlens_to_cu(lens_q), seqlens_to_cu(lens_k)
    q = torch.randn(sum(lens_q), hq, 8)
    k = torch.randn(sum(lens_k), hk, 8)
    v = torch.randn(sum(lens_k), hk, 8)
    with use_backend(backend):
        out = varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                               scale=0.3)
    ref = reference(q, k, v, cu_q, cu_k, causal, 0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_every_segment():
    lens = [3, 5, 3]
    cu = seqlens_to_cu(lens)
    q, k, v = (torch.randn(11, 2, 4, requires_grad=True) for _ in range(3))
    varlen_attention(q, k, v, cu, cu, 5, 5).sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert (t.grad.abs().sum((1, 2)) > 0).all()


def test_unknown_backend_is_a_clear_error():
    q = torch.randn(2, 1, 4)
    cu = seqlens_to_cu([2])
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        varlen_attention(q, q, q, cu, cu, 2, 2, backend="nope")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        varlen_attention(q, q, q, cu, cu, 2, 2, backend="flash")


# the SDPA backend's layouts (mixres.segments): every one is the same attention

@pytest.mark.parametrize("kv_heads", [4, 2])
def test_every_sdpa_layout_matches_reference_on_many_short_segments(kv_heads):
    from mixres.segments import force_layout, run_plan, segment_plan

    g = torch.Generator().manual_seed(0)
    # many tiny images of many lengths (1-17 tokens), a few long ones, a repeated length
    lens = torch.randint(1, 18, (60,), generator=g).tolist() + [70, 3, 90, 3]
    cu = seqlens_to_cu(lens)
    # q, k, v as timm makes them: strided views of one fused (T, 3, heads, d) projection
    qkv = torch.randn(sum(lens), 3, 4, 8, generator=g)
    q, k, v = qkv.unbind(1)
    k, v = k[:, :kv_heads], v[:, :kv_heads]  # GQA: fewer key/value heads
    ref = reference(q, k, v, cu, cu, False, 0.3)
    assert not segment_plan(cu, cu, False, q, k).windows  # the CPU runs groups: no timed choice
    fresh = seqlens_to_cu(lens)  # new offsets: a new plan
    with force_layout(32):  # every window size is built (what a GPU plan measures)
        plan = segment_plan(fresh, fresh, False, q, k)
    assert set(plan.windows) == {32, 64, 128}  # the short ones can share windows
    assert {w.size for w in plan.windows.values()} != set(plan.windows)  # stretched to end at T
    for layout in (0, *plan.windows):
        out = run_plan(plan, q, k, v, False, 0.3, layout=layout)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=f"layout {layout}")
    assert segment_plan(fresh, fresh, False, q, k) is plan  # built once, shared by every layer
    with use_backend("sdpa"):  # the measured choice, through the public entry
        out = varlen_attention(q, k, v, cu, cu, max(lens), max(lens), scale=0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inference", [False, True])
def test_a_plan_is_rebuilt_when_its_offsets_change_in_place(inference):
    # an inference tensor (offsets made under inference_mode) has no version counter: the
    # plan cache compares its contents instead
    from mixres.segments import segment_plan

    with torch.inference_mode(inference):
        cu = seqlens_to_cu([3, 5, 4])
        q = torch.randn(12, 2, 8)
        plan = segment_plan(cu, cu, False, q, q)
        assert segment_plan(cu, cu, False, q, q) is plan
        cu[1:3] = torch.tensor([5, 8], dtype=cu.dtype)  # lengths 5, 3, 4
        assert segment_plan(cu, cu, False, q, q) is not plan
        out = varlen_attention(q, q, q, cu, cu, 5, 5, backend="sdpa")
    torch.testing.assert_close(out.double(), reference(q, q, q, cu, cu, False, None), rtol=1e-5, atol=1e-5)


def test_runs_of_equal_lengths_are_read_as_views_and_match_reference():
    """Sorted by length (as the encoder orders a batch for the SDPA backend), every length
    is one run: its group reads q/k/v through a view and writes one slice."""
    from mixres.segments import force_layout, run_plan, segment_plan

    g = torch.Generator().manual_seed(1)
    lens = sorted(torch.randint(1, 12, (40,), generator=g).tolist()) + [50, 50]
    cu = seqlens_to_cu(lens)
    qkv = torch.randn(sum(lens), 3, 4, 8, generator=g)
    q, k, v = qkv.unbind(1)
    with force_layout(0):
        plan = segment_plan(cu, cu, False, q, k)
    assert all(isinstance(grp.q, int) and isinstance(grp.k, int) for grp in plan.groups)
    out = run_plan(plan, q, k, v, False, 0.3, layout=0)
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, cu, False, 0.3), rtol=1e-5, atol=1e-5)
