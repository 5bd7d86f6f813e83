"""Prometheus metrics of one engine (its own registry, so several engines share a process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_FILL = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("mixres_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.images = Counter("mixres_images", "images embedded", registry=r)
        self.tokens = Counter("mixres_tokens", "image tokens embedded (patch grid)", registry=r)
        self.batches = Counter("mixres_batches", "forwards run", registry=r)
        self.dropped = Counter("mixres_dropped_images", "admitted images dropped before their forward "
                               "(client disconnected, request timed out)", registry=r)
        self.queue_tokens = Gauge("mixres_queue_tokens", "tokens waiting in the queue", registry=r)
        self.queue_images = Gauge("mixres_queue_images", "images waiting in the queue", registry=r)
        self.batch_fill = Histogram("mixres_batch_fill", "tokens of a batch / --max-batch-tokens",
                                    buckets=_FILL, registry=r)
        self.batch_images = Histogram("mixres_batch_images", "images per forward",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.forward_s = Histogram("mixres_forward_seconds", "time of one forward", buckets=_LATENCY,
                                   registry=r)
        self.queue_wait_s = Histogram("mixres_queue_wait_seconds", "time an image waited in the queue",
                                      buckets=_LATENCY, registry=r)
        self.latency_s = Histogram("mixres_request_seconds", "request latency by route", ["route"],
                                   buckets=_LATENCY, registry=r)
        self.decoders_replaced = Counter("mixres_decode_workers_replaced", "decoding pools replaced after a "
                                         "worker died", registry=r)

    def batch_done(self, batch, budget: int, seconds: float, started: float) -> None:
        tokens = sum(it.tokens for it in batch)
        self.batches.inc()
        self.images.inc(len(batch))
        self.tokens.inc(tokens)
        self.batch_fill.observe(tokens / budget)
        self.batch_images.observe(len(batch))
        self.forward_s.observe(seconds)
        for it in batch:
            self.queue_wait_s.observe(started - it.enqueued)

    def queue_changed(self, queue) -> None:
        self.queue_tokens.set(queue.tokens)
        self.queue_images.set(queue.images)

    def request_done(self, route: str, status: int, started: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency_s.labels(route).observe(time.monotonic() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
