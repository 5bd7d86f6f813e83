"""A search server on its own: the encoder in this process embeds the queries.

    python -m mixres.search.app --model tiny-clip --index out/photos [--port 8000] [--api-key K]

The folder is checked and indexed before the port opens (a folder made with another model,
layer or pooling, or one `mixres verify` fails, is refused in one line, exit status 2).
Queries are decoded and resized exactly as `mixres embed` did the folder's images (its
meta.json settings: token bounds, decoder) and encoded one request at a time under
inference mode. `mixres serve --index` mounts the same router on the serving engine, which
batches concurrent queries instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time

import numpy as np

from mixres.search.api import search_router
from mixres.search.folder import folder_prep, model_identity, open_folder
from mixres.search.kinds import EXACT_MAX, KINDS, faiss_module

__all__ = ["LocalEmbedder", "EngineEmbedder", "engine_router", "make_app", "main"]


class LocalEmbedder:
    """async embed(list of image bytes) -> (n, D) pooled vectors, preprocessed as the folder was."""

    def __init__(self, enc, meta: dict):
        self.enc, self.pool = enc, meta["settings"]["pool"]
        self.prep = folder_prep(meta)  # the folder's own preprocessing
        self._lock = threading.Lock()  # one forward at a time on the one model

    def _encode(self, images: list[bytes]) -> np.ndarray:
        import torch

        from mixres.embed.inputs import decode_one
        from mixres.packing import pool_features

        tensors = [decode_one(data, self.prep)[0] for data in images]  # ValueError(reason) on a bad one
        with self._lock, torch.inference_mode():
            return pool_features(self.enc.encode(tensors), self.pool).pooled.float().cpu().numpy()

    async def __call__(self, images: list[bytes]) -> np.ndarray:
        return await asyncio.to_thread(self._encode, images)


class EngineEmbedder:
    """A serving engine's `await engine.embed(images)` as search's embed: a query is packed into
    the engine's batches with every other request's images (mixres.serve.Engine)."""

    def __init__(self, engine):
        self.engine = engine

    async def __call__(self, images: list[bytes]):
        import torch

        return torch.stack([r.pooled for r in await self.engine.embed(images)])


def engine_router(engine, index, *, kind: str = "auto", exact_max: int = EXACT_MAX, search_threads: int = 1,
                  dependencies=()):
    """`mixres serve --index FOLDER`: the search routes over FOLDER, queries embedded by `engine`.

    The folder is checked against the engine's encoder, pooling and preprocessing (refused in
    one line otherwise) and indexed before the server opens its port."""
    t0 = time.perf_counter()
    folder = open_folder(index, expect=model_identity(engine.encoder, engine.pool), prep=engine.prep,
                         kind=kind, exact_max=exact_max)
    faiss_module().omp_set_num_threads(search_threads)
    _say_ready(folder, index, t0)
    return search_router(folder, EngineEmbedder(engine), model=engine.model_name, dependencies=dependencies)


def _say_ready(folder, index, t0: float) -> None:
    how = "loaded from its cache" if folder.from_cache else "built and cached"
    print(f"mixres search: {len(folder.items)} items of {index}, {folder.index.kind.name} index ({how}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def make_app(folder, embed, *, api_key: str | None = None):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="mixres search", docs_url=None, redoc_url=None)
    app.include_router(search_router(folder, embed, api_key=api_key))

    async def one_line(request, exc: HTTPException):  # unknown routes too: the routes' error shape
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = " ".join(f"{request.url.path}: {exc.detail}".split())
        return JSONResponse({"error": {"message": message, "type": kind, "code": exc.status_code}},
                            status_code=exc.status_code)

    app.add_exception_handler(HTTPException, one_line)
    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the model the folder was embedded with")
    p.add_argument("--index", required=True, metavar="FOLDER", help="an output folder of mixres embed")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer <key>")
    p.add_argument("--select-layer", type=int, default=-1)
    p.add_argument("--pool", default=None, help="default: as mixres embed's default for the layer")
    p.add_argument("--device", default=None)
    p.add_argument("--index-kind", default="auto", choices=["auto", *KINDS.names()],
                   help=f"auto: flat (exact) up to --exact-max vectors, ivf above (default {EXACT_MAX})")
    p.add_argument("--exact-max", type=int, default=EXACT_MAX)
    p.add_argument("--search-threads", type=int, default=1,
                   help="faiss threads per query once built (default 1: a query is small work, and "
                        "OpenMP threads that wait on each other beside the encoder's cost more than it)")


def run(args) -> int:
    import uvicorn

    from mixres.encoders import make_encoder, resolve_pool

    t0 = time.perf_counter()
    enc = make_encoder(args.model, select_layer=args.select_layer, device=args.device)
    pool = resolve_pool(args.pool, enc)
    folder = open_folder(args.index, expect=model_identity(enc, pool), kind=args.index_kind,
                         exact_max=args.exact_max)
    faiss_module().omp_set_num_threads(args.search_threads)
    _say_ready(folder, args.index, t0)
    print(f"mixres search: http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    app = make_app(folder, LocalEmbedder(enc, folder.meta), api_key=args.api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixres.search.app", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mixres search: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
