"""Variable-length ("varlen") attention over packed sequences.

All sequences of a batch live in one (T, heads, head_dim) tensor; `cu_q` / `cu_k` are
int32 offsets (B+1,) saying where each segment starts, so segment i of the queries
attends only to segment i of the keys: block-diagonal attention with zero padding.
Separate query and key offsets let the same call serve self-attention, attention
pooling (one query per image) and cross-attention (text queries, image keys).

Backends, behind one registry:
    flash  torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16)
    sdpa   segments grouped by equal (len_q, len_k), one SDPA call per group, short ones in
           block-diagonal chunks where that measures faster (mixres.segments; anywhere)

`causal=True` follows the flash-attention convention: the mask is aligned to the
bottom-right corner, so with len_q < len_k (decoding with a KV cache) the last query
sees every key.

The HF hook at the bottom registers `varlen_attention` in transformers'
AttentionInterface under the name "mixres_varlen"; HF layers then pass the offsets
through their **kwargs untouched (`cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`,
`max_length_k`, the names HF's own flash path uses). Layers that do not forward
**kwargs to their attention (DINOv2 in transformers 5.17) get the same offsets from
`varlen_context`, a context variable the encoder sets around the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
from collections.abc import Callable

import torch

from mixres.prepacked import no_linears
from mixres.registry import Registry
from mixres.segments import run_plan, segment_plan

__all__ = ["varlen_attention", "available_backends", "use_backend", "register_attention_backend",
           "ATTENTION_BACKENDS",
           "HF_ATTN_NAME", "register_hf_attention", "hf_varlen_kwargs", "varlen_context"]


# backends

# name -> fn(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale), with metadata
# `priority` (highest available wins) and `supports(q) -> bool`
ATTENTION_BACKENDS = Registry("attention backend")
_FORCED: list[str] = []


def register_attention_backend(name: str, *, priority: int, supports: Callable[[torch.Tensor], bool]):
    """Register a varlen backend; the available one of highest priority is chosen."""
    return ATTENTION_BACKENDS.register(name, priority=priority, supports=supports)


def _flash_supported(q: torch.Tensor) -> bool:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@register_attention_backend("flash", priority=100, supports=_flash_supported)
def _flash(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    if max_q is None or max_k is None:  # the kernel needs them; callers through HF may not give them
        max_q, max_k = (int((cu[1:] - cu[:-1]).max()) for cu in (cu_q, cu_k))
    kw = {}
    if scale is not None:
        if "scale" in params:
            kw["scale"] = scale
        else:  # torch 2.10 has no scale argument: fold it into q (the kernel scales by d^-0.5)
            q = q * (scale * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if causal:
        # early releases spell causality `is_causal`; later ones use a window
        if "window_size" in params:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
    return varlen_attn(q, k, v, cu_q.int(), cu_k.int(), int(max_q), int(max_k), **kw)


@register_attention_backend("sdpa", priority=10, supports=lambda q: True)
@torch.compiler.disable  # a Python loop over segment lengths: torch.compile runs it eagerly, unbroken
@no_linears  # many small ops, no linear: outside the CPU's packed-linear hook
def _sdpa(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    # Dense SDPA calls over segments laid out by a plan (mixres.segments) built once per
    # offsets and shared by every layer: equal lengths stacked, short segments in
    # block-diagonal chunks where that measured faster. No padding reaches the output.
    return run_plan(segment_plan(cu_q, cu_k, causal, q, k), q, k, v, causal, scale)


_VARLEN_PARAMS: set[str] | None = None


def _varlen_params() -> set[str]:
    global _VARLEN_PARAMS
    if _VARLEN_PARAMS is None:
        from torch.nn.attention.varlen import varlen_attn
        _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
    return _VARLEN_PARAMS


# selection

def available_backends(q: torch.Tensor) -> list[str]:
    """Backends that can run on q's device and dtype, best first."""
    meta = {n: ATTENTION_BACKENDS.meta(n) for n in ATTENTION_BACKENDS.names()}
    names = [n for n, m in meta.items() if m["supports"](q)]
    return sorted(names, key=lambda n: -meta[n]["priority"])


def _choose(q: torch.Tensor, backend: str | None) -> str:
    name = backend or (_FORCED[-1] if _FORCED else None) or os.environ.get("MIXRES_ATTN_BACKEND")
    if name:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(ATTENTION_BACKENDS.unknown(name))
        if not ATTENTION_BACKENDS.meta(name)["supports"](q):
            raise ValueError(f"attention backend {name!r} cannot run on {q.device.type} {q.dtype}; "
                             f"available here: {available_backends(q)}")
        return name
    return available_backends(q)[0]


def plans_segments(x: torch.Tensor) -> bool:
    """Whether attention on x's device and dtype runs through segment plans (the SDPA
    backend), which are fastest when equal lengths lie back to back."""
    return _choose(x, None) == "sdpa"


@contextlib.contextmanager
def use_backend(name: str):
    """Force one backend inside a `with` block (overrides MIXRES_ATTN_BACKEND)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(ATTENTION_BACKENDS.unknown(name))
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                     causal: bool = False, scale: float | None = None,
                     backend: str | None = None) -> torch.Tensor:
    """Block-diagonal attention over packed segments.

    q (Tq, Hq, d), k/v (Tk, Hkv, d) with Hq a multiple of Hkv (GQA); cu_q / cu_k (B+1,)
    offsets; returns (Tq, Hq, d_v). Segment i of q attends only to segment i of k.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"varlen_attention: q/k/v must be (T, heads, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"varlen_attention: {q.shape[1]} query heads cannot share "
                         f"{k.shape[1]} key / {v.shape[1]} value heads")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"varlen_attention: cu_q has {cu_q.numel() - 1} segments, "
                         f"cu_k has {cu_k.numel() - 1}")
    name = _choose(q, backend)
    return ATTENTION_BACKENDS.get(name)(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


# transformers hook

HF_ATTN_NAME = "mixres_varlen"


def _hf_varlen_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """transformers AttentionInterface function: query/key/value (1, heads, T, d) -> (1, T, heads, d).

    The packed sequence is HF's "batch" of one; the offsets arrive through the layers'
    **kwargs. An attention mask cannot be honoured here (there is no padding to mask),
    so one given is an error rather than silently ignored.
    """
    if "cu_seq_lens_q" not in kwargs and (ctx := _context_kwargs()) is not None:
        kwargs = {**ctx, **kwargs}
    if attention_mask is not None:
        raise ValueError("mixres_varlen attention got an attention_mask; packed sequences "
                         "need none (segments come from cu_seq_lens_q/k)")
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None:
        raise ValueError("mixres_varlen attention needs cu_seq_lens_q/cu_seq_lens_k in the "
                         "layer kwargs; call the model through a mixres encoder")
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    if query.shape[0] != 1:
        raise ValueError(f"mixres_varlen attention expects one packed sequence, got batch "
                         f"{query.shape[0]}")
    if dropout and module.training:
        raise ValueError("mixres_varlen attention does not implement attention dropout; "
                         "set attention_dropout=0 or call model.eval()")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu_q, cu_k, kwargs.get("max_length_q"),
                           kwargs.get("max_length_k"), causal=bool(getattr(module, "is_causal", False)),
                           scale=scaling)
    return out[None], None


_CONTEXT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mixres_varlen_kwargs",
                                                                       default=None)


@torch.compiler.disable
def _context_kwargs() -> dict | None:
    # read outside torch.compile: traced, the context's max lengths would be guarded as
    # constants and every new maximum would recompile the layer
    return _CONTEXT.get()


@contextlib.contextmanager
def varlen_context(kwargs: dict):
    """Make `kwargs` (from `hf_varlen_kwargs`) visible to the hook inside a `with` block.

    For HF layers whose forward takes no **kwargs and so cannot pass the offsets on;
    kwargs given to the hook directly take precedence.
    """
    token = _CONTEXT.set(kwargs)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def register_hf_attention() -> str:
    """Register the varlen function with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(HF_ATTN_NAME, _hf_varlen_forward)
    return HF_ATTN_NAME


def hf_varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> dict:
    """The kwargs HF layers forward to the attention function for one packed sequence."""
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max_seqlen, "max_length_k": max_seqlen}
