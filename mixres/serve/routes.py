"""The HTTP routes: embeddings (JSON and multipart), models, health, readiness, metrics.

Every route reads the engine and the limits from `request.app.state.serve` (a `Served`),
so routers compose: `create_app(engine, extra_routers=[...])` adds routes that call
`served(request).engine` the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from mixres.serve.auth import require_api_key
from mixres.serve.engine import Engine
from mixres.serve.errors import ApiError, error_response
from mixres.serve.metrics import CONTENT_TYPE
from mixres.serve.schemas import EmbeddingRequest, embedding_response, image_bytes

__all__ = ["Limits", "Served", "served", "api", "probes", "run_request"]

POLL_S = 0.05  # how often a waiting request checks that its client is still there


@dataclass(frozen=True)
class Limits:
    max_request_images: int = 256
    max_request_bytes: int = 64 << 20
    request_timeout_s: float | None = 60.0


@dataclass(frozen=True)
class Served:
    engine: Engine
    limits: Limits
    model_name: str


def served(request: Request) -> Served:
    return request.app.state.serve


class ClientGone(Exception):
    """The client closed its connection while its images waited."""


async def run_request(request: Request, coro, timeout_s: float | None):
    """Await `coro` (an `engine.embed`) unless the client disconnects or `timeout_s` passes first;
    either way the task is cancelled, which drops its images that no batch has taken yet."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"the request took longer than --request-timeout {timeout_s:g} s; "
                                   "its images still queued were dropped")
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def _embed(request: Request, images: list[bytes], pool, normalize: bool, fmt: str,
                 return_tokens: bool) -> Response:
    s = served(request)
    try:
        results = await run_request(request, s.engine.embed(images, pool=pool, normalize=normalize),
                                    s.limits.request_timeout_s)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the metrics count it
    return JSONResponse(embedding_response(results, s.model_name, fmt, return_tokens))


def _check_count(n: int, limits: Limits) -> None:
    if n == 0:
        raise ApiError(422, "input: send at least one image")
    if n > limits.max_request_images:
        raise ApiError(413, f"input: {n} images, more than this server takes in one request "
                            f"(--max-request-images {limits.max_request_images})")


api = APIRouter(dependencies=[Depends(require_api_key)])


@api.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    s = served(request)
    if body.model is not None and body.model != s.model_name:
        raise ApiError(404, f"model {body.model!r} is not served here (this server serves "
                            f"{s.model_name!r}: GET /v1/models)")
    _check_count(len(body.input), s.limits)
    images = [image_bytes(i, x) for i, x in enumerate(body.input)]
    return await _embed(request, images, body.pool, body.normalize, body.encoding_format, body.return_tokens)


@api.post("/v1/embeddings/upload")
async def upload(request: Request, image: Annotated[list[UploadFile], File()],
                 pool: Annotated[str | None, Form()] = None, normalize: Annotated[bool, Form()] = False,
                 return_tokens: Annotated[bool, Form()] = False,
                 encoding_format: Annotated[str, Form()] = "float") -> Response:
    """Plain files as multipart form fields named `image`: `curl -F image=@cat.jpg`."""
    s = served(request)
    _check_count(len(image), s.limits)
    if encoding_format not in ("float", "base64"):
        raise ApiError(422, f"encoding_format: choose 'float' or 'base64', got {encoding_format!r}")
    if pool not in (None, "model", "cls", "mean"):
        raise ApiError(422, f"pool: choose 'model', 'cls' or 'mean', got {pool!r}")
    images = [await f.read() for f in image]
    return await _embed(request, images, pool, normalize, encoding_format, return_tokens)


@api.get("/v1/models")
async def models(request: Request) -> dict:
    s = served(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": 0,
                                        "owned_by": "mixres"}]}


@api.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(served(request).engine.metrics.render(), media_type=CONTENT_TYPE)


probes = APIRouter()  # unauthenticated: what a load balancer or an orchestrator polls


@probes.get("/health")
async def health() -> dict:
    """Liveness: the process answers HTTP."""
    return {"status": "ok"}


@probes.get("/ready")
async def ready(request: Request) -> Response:
    """Readiness: the model is loaded and the engine loop beat recently (not just that HTTP answers)."""
    ok, why = served(request).engine.ready()
    if ok:
        return JSONResponse({"status": "ready"})
    return error_response(503, f"not ready: {why}", type_="server_unavailable")
