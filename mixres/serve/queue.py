"""The engine's queue: admitted images, measured in tokens, taken in fair varlen batches.

Requests put all their decoded images at once; the engine loop takes a batch whenever the
model is free. A batch takes the waiting requests oldest first, each whole: a request that
fits in one forward is never split over two (its answer would wait for the second), so one
that does not fit in what is left of this batch waits whole for the next, which it starts
(a smaller later request may still fill the gap meanwhile). Only a request larger than the
budget is cut, image by image; one that took half a batch or more and has images left moves
behind the others, so a large request never starves small ones: even when its images fill
the budget alone, the next batch starts with the others. (Round-robin, one image of each
request per round, spread every request over several forwards, each answer waiting for the
last of them.) The first image of a batch always fits (no image is larger than the budget).

Images still being decoded are counted (`arriving`): a batch below the budget waits for
them, up to `ARRIVING_WAIT_S`. Decoding runs at the lowest CPU priority and so mostly while
the model is idle; without the wait, a request that came in during a forward missed the
next one by the few ms of its decode and waited a whole forward more (8 clients of one
image: p99 1.5x the p50).

`one_request=True` takes the oldest request's images only: batching off, the baseline of
`mixres bench serve`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Item", "TokenQueue", "ARRIVING_WAIT_S"]

ARRIVING_WAIT_S = 0.1  # how long a batch below the budget waits for images still being decoded


@dataclass(eq=False)
class Item:
    """One admitted image: its tensor, its token count and where its result goes."""

    image: torch.Tensor
    tokens: int
    request: int
    index: int  # position in its request
    done: Any = None  # called with (item, result | exception) by the engine loop
    enqueued: float = field(default_factory=time.monotonic)


class TokenQueue:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self.images = 0
        self._requests: OrderedDict[int, deque[Item]] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._arriving = 0  # images of requests still being decoded

    def arriving(self, images: int) -> None:
        """`images` more (or, negative, fewer) images are being decoded for a coming `put`."""
        with self._cond:
            self._arriving += images
            self._cond.notify_all()

    def put(self, request: int, items: list[Item]) -> bool:
        """Admit a request's images; False when they do not fit in the queue's token budget
        (an empty queue admits any request: the caller checks a request against the budget)."""
        need = sum(it.tokens for it in items)
        with self._cond:
            if self._closed or (self.tokens and self.tokens + need > self.max_tokens):
                return False
            self._requests[request] = deque(items)
            self.tokens += need
            self.images += len(items)
            self._cond.notify_all()
        return True

    def drop(self, request: int) -> int:
        """Remove a request's images that no batch has taken yet; how many were removed."""
        with self._cond:
            left = self._requests.pop(request, None) or ()
            self.tokens -= sum(it.tokens for it in left)
            self.images -= len(left)
            return len(left)

    def close(self) -> None:
        """No more puts; `take` returns what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def full(self) -> bool:
        return self.tokens >= self.max_tokens

    def take(self, budget: int, max_wait_s: float, idle_s: float,
             one_request: bool = False) -> list[Item] | None:
        """The next batch: waits up to `idle_s` for work ([] if none came: a heartbeat), then up
        to `max_wait_s` more while the batch is below `budget` tokens (`ARRIVING_WAIT_S` while
        images are still being decoded). None once closed and empty."""
        with self._cond:
            if not self._requests:
                if self._closed:
                    return None
                self._cond.wait(idle_s)
                if not self._requests:
                    return None if self._closed else []
            now = time.monotonic()
            deadline, arriving_deadline = now + max_wait_s, now + ARRIVING_WAIT_S
            while self.tokens < budget and not self._closed and not one_request:
                left = (max(deadline, arriving_deadline) if self._arriving else deadline) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._take_one(budget) if one_request else self._take_fair(budget)
            self.tokens -= sum(it.tokens for it in batch)
            self.images -= len(batch)
            return batch

    def _take_fair(self, budget: int) -> list[Item]:
        batch, used, served = [], 0, []
        for r in list(self._requests):
            q = self._requests[r]
            need = sum(it.tokens for it in q)
            if need <= budget - used:  # the whole request (or what is left of it) fits
                batch.extend(q)
                used += need
                del self._requests[r]
            elif need <= budget:  # fits one forward: waits whole for the next, which it starts
                continue
            else:  # larger than any forward: as many of its images as fit
                kept, took = deque(), 0
                for it in q:
                    if used + it.tokens > budget and batch:
                        kept.append(it)  # waits for the next batch; a smaller image after it may fit
                        continue
                    batch.append(it)
                    used += it.tokens
                    took += it.tokens
                if not kept:
                    del self._requests[r]
                else:
                    self._requests[r] = kept
                    if 2 * took >= budget:  # a large request: the others go first next time
                        served.append(r)
            if used >= budget:
                break
        for r in served:  # a request with images left goes behind those it kept waiting
            self._requests.move_to_end(r)
        return batch

    def _take_one(self, budget: int) -> list[Item]:
        r, q = next(iter(self._requests.items()))
        batch, used = [], 0
        while q and (not batch or used + q[0].tokens <= budget):
            it = q.popleft()
            batch.append(it)
            used += it.tokens
        if not q:
            del self._requests[r]
        return batch
