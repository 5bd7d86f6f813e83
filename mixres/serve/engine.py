"""The serving engine: one loop owns the model and packs concurrent requests' images.

    engine = Engine("tiny-vit")
    engine.start()
    results = await engine.embed([png_bytes, jpeg_bytes])   # list of Embedding
    results[0].pooled, results[0].tokens, results[0].grid
    engine.close()                                          # finishes what it admitted

A request's images are decoded in the `DecodePool`, admitted into the `TokenQueue` (or
refused with `Overloaded` when it is full) and packed by the loop thread into varlen
batches of up to `max_batch_tokens` (on the CPU at most the encoder's cache-sized forward)
as soon as the model is free (continuous batching: no fixed batch size; `max_wait_ms` lets
a batch below the budget wait that long for more).
Each image's result is what `load_encoder(model).encode([image])` gives for it alone
(fp32 <= 1e-5): the packed encoder's attention never crosses images, whatever shares the
batch. The loop beats a heartbeat between batches; `ready()` reports it (readiness is the
loop's own liveness, not that HTTP answers).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass

import torch

from mixres.images import DEFAULT_MAX_PIXELS
from mixres.packing import PackedFeatures, check_pool, pool_features
from mixres.preprocess import Preprocessor
from mixres.serve.decoding import DecodePool, ImageError
from mixres.serve.metrics import Metrics
from mixres.serve.queue import Item, TokenQueue

__all__ = ["Embedding", "Engine", "EngineError", "InputError", "Overloaded", "TooLarge", "Unavailable"]

IDLE_S = 0.25  # the heartbeat period of an idle loop
STALL_S = 120.0  # a forward running longer than this makes the engine not ready


class EngineError(RuntimeError):
    """The model failed on a batch (500); the loop goes on."""


class InputError(ValueError):
    """Image `index` of a request cannot be used (400)."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"input[{index}]: {reason}")
        self.index, self.reason = index, reason


class Overloaded(RuntimeError):
    """The queue is full (503 + Retry-After)."""


class TooLarge(ValueError):
    """One request holds more tokens than the whole queue takes (413)."""


class Unavailable(RuntimeError):
    """The engine is not running or is draining (503)."""


@dataclass
class Embedding:
    """One image's result: pooled vector (or None), tokens (prefix first), patch grid."""

    pooled: torch.Tensor | None
    tokens: torch.Tensor
    grid: tuple[int, int]
    num_prefix: int

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class Engine:
    """model: anything `mixres.load_encoder` takes (preset, HF dir, hub id, timm:, open_clip:) or an
    Encoder. batching: "packed" (continuous, fair) or "off" (one request at a time)."""

    def __init__(self, model, *, backend: str = "packed", select_layer: int = -1, pool: str | None = None,
                 max_batch_tokens: int = 8192, max_wait_ms: float = 2.0, max_queue_tokens: int | None = None,
                 min_image_tokens: int = 1, max_image_tokens: int = 1024, max_pixels: int | None = None,
                 decode: str = "pil", decode_workers: int = 0, dtype=None, device=None,
                 batching: str = "packed", model_name: str | None = None):
        from mixres.decode import get_decoder
        from mixres.encoders import make_encoder, resolve_pool

        if batching not in ("packed", "off"):
            raise ValueError(f"batching={batching!r}: choose 'packed' or 'off'")
        if max_image_tokens > max_batch_tokens:
            raise ValueError(f"--max-image-tokens {max_image_tokens} exceeds --max-batch-tokens "
                             f"{max_batch_tokens}: every image must fit in one batch")
        max_queue_tokens = 16 * max_batch_tokens if max_queue_tokens is None else max_queue_tokens
        if max_queue_tokens < max_batch_tokens:
            raise ValueError(f"--max-queue-tokens {max_queue_tokens} is below --max-batch-tokens "
                             f"{max_batch_tokens}")
        check_pool(pool, select_layer)
        get_decoder(decode)  # an unknown decoder fails here, in one line
        self.encoder = make_encoder(model, backend=backend, select_layer=select_layer,
                                    min_image_tokens=min_image_tokens, max_image_tokens=max_image_tokens,
                                    max_batch_tokens="auto", dtype=dtype, device=device)
        self.pool = resolve_pool(pool, self.encoder)
        self.model_name = model_name or (model if isinstance(model, str) else type(model).__name__)
        self.max_batch_tokens = self.step_tokens(max_batch_tokens, max_image_tokens)
        self.max_wait_s = max_wait_ms / 1000
        self.batching = batching
        self.prep = Preprocessor(self.encoder.facts, unit=self.encoder.grid_unit, decode=decode,
                                 min_image_tokens=min_image_tokens, max_image_tokens=max_image_tokens,
                                 max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
        self.metrics = Metrics()
        self.decoder = DecodePool(self.prep, decode_workers, on_replace=self.metrics.decoders_replaced.inc)
        self.queue = TokenQueue(max_queue_tokens)
        self.heartbeat = time.monotonic()
        self.busy_since: float | None = None
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False

    def step_tokens(self, max_batch_tokens: int, max_image_tokens: int) -> int:
        """Tokens one step of the loop takes from the queue: `max_batch_tokens`, and on the CPU
        at most the encoder's own cache-sized forward (`cpu_chunk_tokens`; an image of up to
        `max_image_tokens` still fits). A bigger forward there costs more per token (a
        6-layer 384-wide CLIP tower: 60 ms an image at 15 images a forward, 39 ms at 9), and a
        step's results go back only when the whole step is done."""
        chunk = self.encoder.chunk_budget(self.encoder.device)
        if chunk is None:
            return max_batch_tokens
        return min(max_batch_tokens, max(chunk, max_image_tokens))

    # lifecycle

    def start(self) -> Engine:
        if self._thread is None:
            self.decoder.warm_up()
            self._thread = threading.Thread(target=self._loop, name="mixres-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting, finish every admitted image, stop the loop and the decoders."""
        self._closing = True
        self.queue.close()
        if self._thread is not None:
            self._thread.join(timeout)
        self.decoder.close()

    def ready(self) -> tuple[bool, str]:
        """(ready, why not): the loop thread is alive and beat recently (or is inside a forward
        younger than STALL_S)."""
        now = time.monotonic()
        if self._closing:
            return False, "draining"
        if self._thread is None or not self._thread.is_alive():
            return False, "engine loop is not running"
        busy = self.busy_since
        if busy is not None:
            return (now - busy < STALL_S), f"a forward has run for {now - busy:.0f} s"
        return (now - self.heartbeat < 4 * IDLE_S + 1.0), f"no heartbeat for {now - self.heartbeat:.1f} s"

    # requests

    async def embed(self, images, *, pool: str | None = None, normalize: bool = False) -> list[Embedding]:
        """Each image's Embedding, in order. images: encoded bytes, PIL images or preprocessed
        (3, H, W) tensors. Raises InputError (naming the index), TooLarge, Overloaded, Unavailable."""
        if self._closing or self._thread is None:
            raise Unavailable("the engine is draining" if self._closing else "the engine is not started")
        pool = self.pool if pool is None else check_pool(pool, self.encoder.select_layer,
                                                         self.encoder.num_prefix)
        if self.queue.full():
            raise Overloaded(f"the queue holds {self.queue.tokens} tokens (--max-queue-tokens "
                             f"{self.queue.max_tokens}); retry later")
        loop = asyncio.get_running_loop()
        self.queue.arriving(len(images))  # a batch below the budget waits for them (briefly)
        try:
            tensors = await self._decode_all(images)
            p = self.encoder.patch_size
            need = [(t.shape[1] // p) * (t.shape[2] // p) for t in tensors]
            if sum(need) > self.queue.max_tokens:
                raise TooLarge(f"the request's {len(tensors)} images hold {sum(need)} tokens, more than "
                               f"the whole queue takes (--max-queue-tokens {self.queue.max_tokens})")
            futures = [loop.create_future() for _ in tensors]

            def done(item: Item, result) -> None:  # called on the loop thread
                loop.call_soon_threadsafe(_settle, futures[item.index], result)

            rid = next(self._ids)
            items = [Item(t, n, rid, i, done) for i, (t, n) in enumerate(zip(tensors, need))]
            admitted = self.queue.put(rid, items)
        finally:  # in the queue, refused or failed: nothing of this request is arriving any more
            self.queue.arriving(-len(images))
        if not admitted:
            if self._closing:
                raise Unavailable("the engine is draining")
            raise Overloaded(f"the queue holds {self.queue.tokens} tokens and this request needs "
                             f"{sum(need)} more (--max-queue-tokens {self.queue.max_tokens}); retry later")
        self.metrics.queue_changed(self.queue)
        try:
            feats = await asyncio.gather(*futures)
        except BaseException:  # cancelled (client gone, timeout) or failed: free its queue slots
            dropped = self.queue.drop(rid)
            self.metrics.dropped.inc(dropped)
            self.metrics.queue_changed(self.queue)
            raise
        return [self._result(f, pool, normalize) for f in feats]

    async def _decode_all(self, images) -> list[torch.Tensor]:
        got = await asyncio.gather(*(self.decoder.decode(img) for img in images), return_exceptions=True)
        for i, g in enumerate(got):
            if isinstance(g, ImageError):
                raise InputError(i, g.reason)
            if isinstance(g, BaseException):
                raise g
        return got

    def _result(self, f: PackedFeatures, pool: str, normalize: bool) -> Embedding:
        pooled = pool_features(f, pool).pooled
        if pooled is not None:
            pooled = pooled[0]
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
        h, w = (int(x) for x in f.grid_hw[0])
        return Embedding(pooled, f.tokens, (h, w), f.num_prefix)

    # the loop (its own thread: it owns the model)

    def _loop(self) -> None:
        one = self.batching == "off"
        while True:
            self.heartbeat = time.monotonic()
            batch = self.queue.take(self.max_batch_tokens, self.max_wait_s, IDLE_S, one_request=one)
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[Item]) -> None:
        start = self.busy_since = time.monotonic()
        try:
            with torch.inference_mode():  # grad mode is per thread: a new thread has it on
                feats = self.encoder.encode([it.image for it in batch]).to("cpu", torch.float32)
            parts = [feats.select([k]) for k in range(len(batch))]
        except Exception as e:
            parts = [EngineError(f"the model failed on a batch of {len(batch)} images "
                                 f"({type(e).__name__}: {e})")] * len(batch)
        finally:
            self.busy_since = None
        self.metrics.batch_done(batch, self.max_batch_tokens, time.monotonic() - start, start)
        self.metrics.queue_changed(self.queue)
        for it, part in zip(batch, parts):
            it.done(it, part)


def _settle(fut: asyncio.Future, result) -> None:
    if fut.done():  # its request was cancelled meanwhile
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)
