"""HTTP routes of search: a FastAPI router to mount on the server's app.

    router = search_router(folder, embed, model="clip-b16", api_key=None)
    app.include_router(router)

    GET  /                          the page (mixres/search/page.html; public, asks for the key)
    GET  /v1/index                  what is indexed: model, items, index kind
    POST /v1/search                 {"input": <data URI or base64 of an image>, "k": 10}
                                    or {"key": <a key of the folder>, "k": 10}
    GET  /v1/items/{id}             {"id", "key", "metadata"}
    GET  /v1/items/{id}/thumbnail   JPEG, read from the indexed source, resized on the server

`embed` is an async callable: list of encoded image bytes -> (n, D) pooled vectors (numpy or
torch), raising ValueError(reason) for an image it cannot read. The server passes its
packing engine's embed, so a burst of searches is batched like a burst of embeddings.

Every error is one line in OpenAI's error shape, as the rest of the server answers,
`{"error": {"message": "...", "type": "...", "code": <status>}}`: 400 unreadable JSON,
base64 or image; 401 no or wrong API key; 404 unknown key or id; 410 an item whose source
can no longer be read; 413 a body over the limit; 422 a field of the wrong type or out of
range. Nothing a request names is opened as a path.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from importlib import resources

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mixres.search.thumbnails import UnreadableItem

__all__ = ["search_router", "MAX_K", "MAX_BODY_BYTES"]

MAX_K = 1000
MAX_BODY_BYTES = 32 << 20
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 410: "not_found_error"}
_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.ASCII)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, " ".join(str(message).split())  # one line


def decode_image_input(value) -> bytes:
    """The bytes of `input`: a data URI (`data:image/png;base64,...`) or bare base64."""
    if not isinstance(value, str):
        raise BadRequest(422, f"input: expected a string (a data URI or base64 of an image file), "
                              f"got {type(value).__name__}")
    text = value.strip()
    m = _DATA_URI.match(text)
    if text.startswith("data:") and not m:
        raise BadRequest(400, "input: a data URI that is not base64 (expected data:image/...;base64,...)")
    try:
        data = base64.b64decode("".join(text[m.end() if m else 0:].split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "input: not base64 (expected a data URI or base64 of an image file)") from None
    if not data:
        raise BadRequest(400, "input: empty")
    return data


def _k(body: dict, n: int) -> int:
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadRequest(422, f"k: expected an integer in [1, {MAX_K}], got {json.dumps(k)[:40]}")
    return min(k, n)


def _as_matrix(vectors) -> np.ndarray:
    if hasattr(vectors, "detach"):  # a torch tensor
        vectors = vectors.detach().float().cpu().numpy()
    return np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)


def _item_id(text: str, n: int) -> int:
    if not text.isascii() or not text.isdigit() or int(text) >= n:
        raise BadRequest(404, f"item {text[:40]!r} is not in the index (ids are 0..{n - 1})")
    return int(text)


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes MAX_BODY_BYTES: a huge upload is not held."""
    too_large = BadRequest(413, f"request body: over the limit of {MAX_BODY_BYTES} bytes")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def search_router(folder, embed, *, model: str | None = None, api_key: str | None = None,
                  dependencies=()):
    """The routes above over an opened folder (`mixres.search.open_folder`).

    api_key       checked here (Bearer), for an app that has no key check of its own
    dependencies  FastAPI dependencies of every /v1 route (the server's own API key check)
    """
    index, items, n = folder.index, folder.items, len(folder.items)
    model = model or folder.model
    page = resources.files("mixres.search").joinpath("page.html").read_text()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise BadRequest(401, "missing or wrong API key (send Authorization: Bearer <key>)")

    def error(e: BadRequest) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        kind = _ERROR_TYPES.get(e.status, "invalid_request_error")
        return JSONResponse({"error": {"message": e.message, "type": kind, "code": e.status}},
                            status_code=e.status, headers=headers)

    def results(vector: np.ndarray, k: int) -> list[dict]:
        scores, ids = index.search(vector[None], k)
        return [{"rank": rank, **items.describe(int(i)), "score": float(s)}
                for rank, (i, s) in enumerate(zip(ids[0], scores[0])) if i >= 0]

    async def query_vector(body: dict) -> np.ndarray:
        if ("input" in body) == ("key" in body):
            raise BadRequest(422, "give either 'input' (an image as a data URI or base64) or 'key' "
                                  "(a key of the index), not both")
        if "key" in body:
            key = body["key"]
            if not isinstance(key, str):
                raise BadRequest(422, f"key: expected a string, got {type(key).__name__}")
            i = items.id_of(key)
            if i is None:
                raise BadRequest(404, f"key {key[:200]!r} is not in the index")
            return index.vector(i)
        data = decode_image_input(body["input"])
        try:
            vectors = await embed([data])
        except ValueError as e:  # the engine's InputError names input[0]; this request has one
            raise BadRequest(400, f"input: {getattr(e, 'reason', e)}") from None
        return _as_matrix(vectors)[0]

    router = APIRouter()
    v1 = APIRouter(dependencies=list(dependencies))

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def get_page():
        return HTMLResponse(page)

    @v1.get("/v1/index")
    async def get_index(request: Request):
        try:
            check_key(request)
        except BadRequest as e:
            return error(e)
        return {"object": "index", "model": model, "items": n, **index.describe()}

    @v1.post("/v1/search")
    async def post_search(request: Request):
        try:
            check_key(request)
            raw = await _read_body(request)
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise BadRequest(400, f"request body: not valid JSON ({e})") from None
            if not isinstance(body, dict):
                raise BadRequest(422, f"request body: expected a JSON object, got {type(body).__name__}")
            k = _k(body, n)
            vector = await query_vector(body)
        except BadRequest as e:
            return error(e)
        return {"object": "list", "data": await run_in_threadpool(results, vector, k), "model": model}

    @v1.get("/v1/items/{item_id}")
    def get_item(item_id: str, request: Request):
        try:
            check_key(request)
            return items.describe(_item_id(item_id, n))
        except BadRequest as e:
            return error(e)

    @v1.get("/v1/items/{item_id}/thumbnail")
    def get_thumbnail(item_id: str, request: Request):
        try:
            check_key(request)
            i = _item_id(item_id, n)
            try:
                jpeg = folder.thumbnails.jpeg(i)
            except UnreadableItem as e:
                raise BadRequest(410, f"item {i} ({items.key_of(i)}): {e}") from None
        except BadRequest as e:
            return error(e)
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    router.include_router(v1)
    return router
