"""The decoding pool: request bytes -> normalized (3, H, W) tensors, off the event loop.

Decoding runs in worker processes (`workers >= 1`) or, with `workers=0`, in threads of the
server process. A worker never dies of a bad file: every decoder error comes back as that
image's `ImageError`. A worker that dies anyway (a crash inside a C decoder, the OOM killer,
`kill -9`) breaks its `ProcessPoolExecutor`; the pool is replaced at once and the jobs it
held are tried once more on the new one, so only an image that kills a worker twice fails,
as a 400 naming it, and every later request is served by the new workers. (Infinity 0.0.78's
single preprocessing thread dies on a truncated PNG, and every later request hangs.)

`prepare_image` is the one place where bytes become a tensor.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from mixres.preprocess import Preprocessor

__all__ = ["DecodePool", "ImageError", "prepare_image"]


class ImageError(ValueError):
    """One image of a request could not be decoded; `reason` is one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def prepare_image(data, prep: Preprocessor) -> torch.Tensor:
    """Encoded image bytes (or a PIL image, or a ready (3, H, W) tensor, checked) -> normalized
    (3, H, W) float32 on the patch grid, on the CPU. Raises ImageError(reason). The HTTP routes
    only ever pass bytes: the server opens no path and fetches no URL a request names."""
    from mixres.images import ImageLoadError

    try:
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        return prep(data).cpu()
    except ImageLoadError as e:
        raise ImageError(e.reason) from None
    except Exception as e:  # a decoder's bug on a weird file is that file's problem, not the server's
        raise ImageError(f"cannot decode ({type(e).__name__}: {e})") from None


def _decode_in_worker(data: bytes, prep: Preprocessor) -> np.ndarray:
    # a numpy array pickles as plain bytes; a torch tensor would go through shared-memory handles
    return prepare_image(data, prep).numpy()


def _init_worker() -> None:
    torch.set_num_threads(1)  # the encoder owns the cores; a worker decodes one image at a time
    _lower_priority()


def _lower_priority() -> None:
    """Run the calling thread (and the threads it starts) at the lowest CPU priority.

    Decoding shares the cores with the engine's forward. At equal priority the scheduler
    splits a core between them mid-forward, and every parallel region of the forward then
    waits for its preempted thread; at nice 19 decoding takes the gaps the forward leaves
    (its Python between ops, the engine idle) and only those. Linux applies the nice value
    of a thread id to that thread alone."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux / not permitted: decode at normal priority
        pass


class DecodePool:
    """`await pool.decode(data)` -> tensor, on `workers` processes (0: threads)."""

    def __init__(self, prep: Preprocessor, workers: int = 0, on_replace: Callable[[], None] | None = None):
        if workers < 0:
            raise ValueError(f"decode workers must be >= 0, got {workers}")
        self.prep, self.workers, self.on_replace = prep, workers, on_replace
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> Executor:
        if self.workers == 0:
            return ThreadPoolExecutor(max_workers=2, thread_name_prefix="mixres-decode",
                                      initializer=_lower_priority)
        # spawn, not fork: the server has threads (the engine loop, uvicorn) a fork would copy mid-state
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)

    def warm_up(self) -> None:
        """Start the worker processes now (a spawn imports torch: seconds), not on the first request."""
        if isinstance(self._pool, ProcessPoolExecutor):
            list(self._pool.map(_init_worker_ready, range(self.workers)))

    def pids(self) -> list[int]:
        procs = getattr(self._pool, "_processes", None) or {}
        return sorted(procs)

    def _replace(self, broken: Executor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = self._new_pool()
                if self.on_replace is not None:
                    self.on_replace()
        broken.shutdown(wait=False, cancel_futures=True)

    async def decode(self, data: bytes) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            pool = self._pool
            try:
                if isinstance(pool, ThreadPoolExecutor):
                    return await loop.run_in_executor(pool, prepare_image, data, self.prep)
                return torch.from_numpy(await loop.run_in_executor(pool, _decode_in_worker, data, self.prep))
            except BrokenProcessPool:
                self._replace(pool)
                if attempt:
                    raise ImageError("the decoding worker died on this image (it was replaced)") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _init_worker_ready(_: int) -> int:
    return 0
