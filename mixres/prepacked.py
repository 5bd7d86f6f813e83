"""Linear layers on the CPU through oneDNN with each weight packed once.

`F.linear` on the CPU calls the BLAS with the weight as it is stored, so every call re-lays
the (out, in) matrix out into the kernel's blocks. oneDNN can keep the weight in its blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`, the path inductor's CPU freezing takes):
measured on this project's CPU benchmark machine (2 threads, AVX-512), 866 tokens through
ViT-B/16's four linear shapes, fp32: 12-16 % less time per GEMM; bf16: 12-16 %; end to end
ViT-B/16 on 96 images of 1-16 tokens: 7 %.

`prepacked_linears()` is a context in which every `F.linear` (so every `nn.Linear`, HF's,
timm's, open_clip's `in_proj` alike) that runs on the CPU without autograd goes that way,
its packed weight cached per weight tensor (weak keys: it goes with the weight) and
re-packed when the weight changes (its version counter: an optimizer step, a
`load_state_dict`). Nothing is patched: the model's modules and weights are untouched, and
outside the context nothing changes. It costs one packed copy of each linear weight for
as long as the weight lives; `MIXRES_CPU_PREPACK=0` turns it off.

Results are the same GEMM in another summation order (~5e-7 relative per GEMM against the
BLAS). The packing is for one fixed batch size, so a row's output does not depend on how
many rows share the call (checked for 1 to 2047 rows): a resumed `mixres embed` run still
equals an uninterrupted one bit for bit. (The BLAS itself is not batch-independent below 8
rows.)
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["prepacked_linears", "prepack_available", "packed_linear", "no_linears"]

# the batch size oneDNN packs for; one value for every call keeps results batch-independent
# (a pack for 1 row runs a 1-row call through another kernel)
PACK_ROWS = 2048
_PACKED = WeakIdKeyDictionary()  # weight -> (stamp, packed weight)


@functools.cache
def _kernels_present() -> bool:
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def prepack_available() -> bool:
    """Whether `prepacked_linears` does anything here (oneDNN present, not turned off)."""
    return os.environ.get("MIXRES_CPU_PREPACK", "1") != "0" and _kernels_present()


def _dtypes() -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if _bf16() else (torch.float32,)


def _packed(w: torch.Tensor) -> torch.Tensor:
    # keyed on the stored tensor: a patch embedding passes `conv.weight.flatten(1)`, a new
    # view every call, whose own entry would die with it and be packed again each forward
    base = w._base if w._base is not None else w
    stamp = (w.data_ptr(), w._version, tuple(w.shape), w.stride(), w.dtype)
    hit = _PACKED.get(base)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)
    _PACKED[base] = (stamp, packed)
    return packed


def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ w.T + b through oneDNN with w packed once, or None where that does not apply (not
    the CPU, a dtype oneDNN packs no faster here, autograd, a tensor subclass, an inference
    tensor weight, whose changes no version counter records)."""
    if type(x) is not torch.Tensor or type(w) not in (torch.Tensor, torch.nn.Parameter):
        return None
    if b is not None and (type(b) not in (torch.Tensor, torch.nn.Parameter) or b.ndim != 1
                          or b.dtype != w.dtype):
        return None
    if (x.device.type != "cpu" or w.device.type != "cpu" or w.ndim != 2 or x.ndim < 2
            or x.dtype != w.dtype or w.dtype not in _dtypes() or x.numel() == 0 or w.is_inference()):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                    or (b is not None and b.requires_grad)):
        return None
    return torch.ops.mkldnn._linear_pointwise(x, _packed(w), b, "none", [], "")


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.compiler.is_compiling():
            given = dict(zip(("input", "weight", "bias"), args), **kwargs)  # timm passes weight=
            if len(given) == len(args) + len(kwargs) and {"input", "weight"} <= given.keys():
                out = packed_linear(given["input"], given["weight"], given.get("bias"))
                if out is not None:
                    return out
        return func(*args, **kwargs)


def prepacked_linears(enabled: bool = True):
    """A context in which CPU linear layers without autograd run on packed oneDNN weights
    (a no-op where `prepack_available()` is False or `enabled` is)."""
    if not (enabled and prepack_available()):
        return contextlib.nullcontext()
    return _Mode()


def no_linears(fn):
    """Decorate code that runs no linear layer (the attention's loop over segment lengths:
    ~1,500 small ops a forward over 1-16-token images) to run with the mode set aside, so
    those ops skip its Python hook (~1 us each)."""
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if isinstance(_get_current_function_mode(), _Mode):
            with _pop_mode_temporarily():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run
