"""`mixres serve`: the embedding server on uvicorn (or Ray Serve replicas with --engine ray)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from mixres.packing import POOLERS

__all__ = ["add_arguments", "run", "engine_kwargs", "limits_of"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="anything `mixres.load_encoder` takes: a preset (random weights), a local HF "
                        "directory, a hub id, timm:<name>, open_clip:<arch>[:<pretrained>]")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as 'model' and /v1/models lists (default: --model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MIXRES_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: "
                        "$MIXRES_API_KEY; unset: no key)")
    p.add_argument("--backend", default="packed", help="encoder backend (default packed; masked pads)")
    p.add_argument("--batching", default="packed", choices=["packed", "off"],
                   help="packed: continuous varlen batches across requests; off: one request at a time")
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="token budget of one forward (on the CPU at most 2048, the encoder's "
                        "cache-sized forward)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a batch below the budget may wait for more images while the model is free")
    p.add_argument("--max-queue-tokens", type=int, default=None,
                   help="tokens admitted and waiting; beyond it requests get 503 + Retry-After "
                        "(default 16 x --max-batch-tokens)")
    p.add_argument("--min-image-tokens", type=int, default=1, help="smaller images are upscaled to this")
    p.add_argument("--max-image-tokens", type=int, default=1024, help="larger images are downscaled to this")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more pixels, read from the header (default: the bomb guard)")
    p.add_argument("--pool", default=None, choices=sorted(set(POOLERS) - {"none"}),
                   help="the default pooled vector (a request may ask for another): model's pooler, cls, "
                        "mean (default: model for --select-layer -1, else cls or mean)")
    p.add_argument("--select-layer", type=int, default=-1, help="-1: last layer; -2: penultimate")
    p.add_argument("--decode", default="pil",
                   help="pil (PIL, as model processors do) or fast (libjpeg-turbo)")
    p.add_argument("--decode-workers", type=int, default=0,
                   help="decoding processes, each replaced if it dies (default 0: two threads of the server "
                        "process; on a busy 2-core box its forwards measured 15x slower beside a decoding "
                        "process than beside threads)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: as loaded)")
    p.add_argument("--max-request-images", type=int, default=256, help="images in one request (413 beyond)")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="request body size (413 beyond)")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a request may take (504 after; its queued images are dropped); 0: none")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local: this process; ray: --ray-replicas Ray Serve replicas behind Ray's proxy")
    p.add_argument("--ray-replicas", type=int, default=1)
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--index", default=None, metavar="FOLDER",
                   help="also search FOLDER, an output folder of mixres embed made with this model: "
                        "POST /v1/search, GET / (a page to try it); pip install 'mixres[search]'")
    p.add_argument("--index-kind", default="auto", choices=["auto", "flat", "ivf", "hnsw"],
                   help="faiss index of --index (auto: flat, exact, up to --exact-max vectors; ivf above)")
    p.add_argument("--exact-max", type=int, default=100_000, help="--index-kind auto: flat up to this size")
    p.add_argument("--search-threads", type=int, default=1, help="faiss threads per search query")


def engine_kwargs(args) -> dict:
    """The `Engine(...)` arguments of the command line (also what each Ray replica builds)."""
    return dict(model=args.model, backend=args.backend, batching=args.batching,
                select_layer=args.select_layer, pool=args.pool, max_batch_tokens=args.max_batch_tokens,
                max_wait_ms=args.max_wait_ms,
                max_queue_tokens=args.max_queue_tokens, min_image_tokens=args.min_image_tokens,
                max_image_tokens=args.max_image_tokens, max_pixels=args.max_pixels, decode=args.decode,
                decode_workers=args.decode_workers, dtype=args.dtype, device=args.device,
                model_name=args.served_model_name)


def limits_of(args):
    from mixres.serve.routes import Limits

    return Limits(args.max_request_images, args.max_request_bytes, args.request_timeout or None)


def passive_omp_threads() -> None:
    """Restart this process once with OMP_WAIT_POLICY=PASSIVE unless the variable is set.

    The engine's forwards share the CPU with decoding threads, the event loop and HTTP. With
    OpenMP's default policy, torch's idle intra-op threads spin between parallel regions and
    take the cores those need: measured with `mixres bench serve` (2 cores, 8 clients x 1
    image) 13.5 images/s spinning, 17.2 passive. libgomp reads the variable once, when torch
    loads it, which `import mixres` has done by now: hence the restart (same PID, same
    arguments). Set OMP_WAIT_POLICY yourself to choose."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    # silent: a refused start must stay one line on stderr (docs/serve.md says it)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def run(args) -> int:
    if args.engine == "ray":
        if args.index:
            raise ValueError("--index runs with --engine local (one process holds the index)")
        from mixres.serve.ray_replica import serve_on_ray

        return serve_on_ray(args, engine_kwargs(args), limits_of(args))
    passive_omp_threads()
    import uvicorn

    from mixres.serve.app import create_app
    from mixres.serve.engine import Engine

    engine = Engine(**engine_kwargs(args))
    routers = []
    if args.index:  # checked and indexed before the port opens; refused in one line
        from fastapi import Depends

        from mixres.search.app import engine_router
        from mixres.serve.auth import require_api_key

        routers.append(engine_router(engine, args.index, kind=args.index_kind, exact_max=args.exact_max,
                                     search_threads=args.search_threads,
                                     dependencies=[Depends(require_api_key)]))
    app = create_app(engine, api_key=args.api_key, limits=limits_of(args), extra_routers=routers)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=False, lifespan="on"))
    # uvicorn drains on SIGTERM / SIGINT, then re-raises the signal to the handler it found: a
    # no-op here, so a drained server exits 0 instead of dying of the signal it already handled
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"mixres serve: {engine.model_name} on http://{args.host}:{args.port} "
          f"(max-batch-tokens {args.max_batch_tokens}, decode {args.decode})", file=sys.stderr, flush=True)
    server.run()
    print("mixres serve: drained and stopped", file=sys.stderr, flush=True)
    return 0 if server.started else 1
