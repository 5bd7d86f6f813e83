"""Keep freed activation memory in the process (glibc malloc), for CPU runs of `mixres`.

PyTorch's CPU tensors come from malloc. glibc serves a block above its mmap threshold (a
few MB, moved up as blocks are freed) with a fresh mmap and trims freed memory at the top
of its heap back to the system, so a forward's 5-25 MB activations keep landing on pages
the kernel must fault in and zero again: measured 35,000-50,000 page faults per forward
(DINOv2-S/14 and ViT-B/16 on 96 images of 1-16 tokens), GELU 4x slower on faulting pages
than on warm ones, every forward 15 % slower end to end, and which tensor pays changes
from run to run (the largest noise in this project's CPU benchmarks). PyTorch's CPU tuning
advice is a caching allocator (jemalloc, tcmalloc) through LD_PRELOAD; this is the same
effect in-process with glibc's own knobs: blocks up to `MMAP_THRESHOLD` come from the heap
and up to `TRIM_THRESHOLD` of freed heap stays mapped for the next forward (0 faults a
forward after the first).

Only processes mixres starts call it: the `mixres` command line, Ray Data encoder actors
and Ray Serve replicas (each a process of its own); a library user's process is left as it
is. Not applied where the user set glibc's own MALLOC_*_ variables or GLIBC_TUNABLES' malloc, or
MIXRES_MALLOC=0, or the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap (ViT-g's 2k-token MLP: 50 MB)
TRIM_THRESHOLD = 1 << 30  # freed heap kept for reuse, at most this much
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_applied: list[bool] = []


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); True if they are set."""
    if _applied:
        return _applied[0]
    ok = False
    user_set = (any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ)
                or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))
    if sys.platform.startswith("linux") and os.environ.get("MIXRES_MALLOC", "1") != "0" and not user_set:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = None
        if mallopt is not None:
            # older glibc caps the mmap threshold at 32 MB (HEAP_MAX_SIZE / 2)
            mmap = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            ok = bool(mmap) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _applied.append(ok)
    return ok
