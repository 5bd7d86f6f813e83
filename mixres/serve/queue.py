"""The engine's queue: admitted images, measured in tokens, taken in fair varlen batches.

Requests put all their decoded images at once; the engine loop takes a batch whenever the
model is free. A batch is built round-robin over the waiting requests: one image of each
request per round, for as many rounds as the token budget allows, starting with the request
served least recently (a request that got an image moves behind those that did not). So a
request's images may span batches, and a large request never starves small ones: even when
its images fill the budget alone, the next batch starts with the others. The first image of
a batch always fits (no image is larger than the budget). `one_request=True` takes the oldest
request's images only: batching off, the baseline of `mixres bench serve`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Item", "TokenQueue"]


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
        to `max_wait_s` more while the batch is below `budget` tokens. None once closed and empty."""
        with self._cond:
            if not self._requests:
                if self._closed:
                    return None
                self._cond.wait(idle_s)
                if not self._requests:
                    return None if self._closed else []
            deadline = time.monotonic() + max_wait_s
            while self.tokens < budget and not self._closed and not one_request:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._take_one(budget) if one_request else self._take_fair(budget)
            self.tokens -= sum(it.tokens for it in batch)
            self.images -= len(batch)
            return batch

    def _take_fair(self, budget: int) -> list[Item]:
        batch, used, served = [], 0, []
        open_ = list(self._requests)
        while open_:
            still = []
            for r in open_:
                q = self._requests[r]
                if used + q[0].tokens > budget and batch:
                    continue  # this request's next image waits for the next batch
                it = q.popleft()
                batch.append(it)
                used += it.tokens
                if q:
                    still.append(r)
                    if r not in served:
                        served.append(r)
                else:
                    del self._requests[r]
            open_ = still
        for r in served:  # behind the requests this batch skipped
            if r in self._requests:
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
