"""The ASGI app: `create_app(engine)` -> FastAPI, for uvicorn, Ray Serve or your own server.

    app = create_app(Engine("tiny-vit"), api_key="secret", extra_routers=[my_router])

The app starts the engine when it starts and drains it when it stops (uvicorn's SIGTERM:
stop accepting, finish the requests in flight, then `engine.close()` finishes every admitted
image). `extra_routers` are mounted as they are; a route protects itself with
`Depends(mixres.serve.require_api_key)` and finds the engine at `served(request).engine`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from mixres.serve.engine import Engine
from mixres.serve.errors import error_response, install
from mixres.serve.routes import Limits, Served, api, probes

__all__ = ["create_app"]


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: refuses bodies over `max_bytes` (413, before or while reading them) and
    records every request's route, status and latency in the engine's metrics."""

    def __init__(self, app, engine: Engine, max_bytes: int):
        self.app, self.engine, self.max_bytes = app, engine, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [0]
        too_large = error_response(413, f"the request body is over --max-request-bytes {self.max_bytes}")
        length = dict(scope.get("headers") or ()).get(b"content-length")
        try:
            if length is not None and int(length) > self.max_bytes:
                status[0] = 413
                return await too_large(scope, receive, send)
            seen = [0]

            async def counted_receive():
                msg = await receive()
                seen[0] += len(msg.get("body", b""))
                if seen[0] > self.max_bytes:
                    raise _BodyTooLarge()
                return msg

            async def recorded_send(msg):
                if msg["type"] == "http.response.start":
                    status[0] = msg["status"]
                await send(msg)

            try:
                await self.app(scope, counted_receive, recorded_send)
            except _BodyTooLarge:
                if status[0]:
                    raise
                status[0] = 413
                await too_large(scope, receive, send)
        finally:
            route = "other" if status[0] == 404 else scope.get("path", "?")  # no label per unknown path
            self.engine.metrics.request_done(route, status[0] or 500, start)


def create_app(engine: Engine, *, api_key: str | None = None, extra_routers: Sequence[APIRouter] = (),
               limits: Limits | None = None, model_name: str | None = None) -> FastAPI:
    """The server's app around `engine` (started with the app, drained when it stops)."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(engine.start)  # spawns the decoding workers: seconds
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="mixres serve", lifespan=lifespan,
                  description="Image embeddings, each image at its own size, packed without padding.")
    app.state.api_key = api_key
    app.state.serve = Served(engine, limits, model_name or engine.model_name)
    install(app)
    app.include_router(probes)
    app.include_router(api)
    for router in extra_routers:
        app.include_router(router)
    app.add_middleware(Guard, engine=engine, max_bytes=limits.max_request_bytes)
    return app
