"""Beyond one machine: Ray Serve replicas, each running this engine and app, Ray's proxy in front.

    from ray import serve
    from mixres.serve.ray_replica import deployment
    serve.run(deployment({"model": "tiny-vit"}, replicas=4), route_prefix="/")

Each replica is a Ray actor holding one `Engine` (its own model, queue and loop) behind the
same FastAPI app `mixres serve` runs, so the API, the errors and the guarantee are the same;
Ray's proxy spreads requests over the replicas. `mixres serve --engine ray --ray-replicas N`
does this on a local Ray (or `--ray-address`) and stops it on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading

__all__ = ["deployment", "serve_on_ray"]


def deployment(engine_kwargs: dict, *, api_key: str | None = None, limits=None, replicas: int = 1,
               cpus_per_replica: float = 1, gpus_per_replica: float = 0):
    """A bound Ray Serve application of `replicas` replicas of `Engine(**engine_kwargs)`."""
    from ray import serve

    from mixres.serve.app import create_app
    from mixres.serve.engine import Engine

    if replicas < 1:
        raise ValueError(f"--ray-replicas must be >= 1, got {replicas}")

    @serve.deployment(name="mixres", num_replicas=replicas,
                      ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    @serve.ingress()
    class MixresEmbeddings:
        def __init__(self):
            from mixres.allocator import keep_freed_memory

            keep_freed_memory()  # a replica is a process of its own, as `mixres serve` is
            self.engine = Engine(**engine_kwargs)

        def __serve_build_asgi_app__(self):
            return create_app(self.engine, api_key=api_key, limits=limits)

    return MixresEmbeddings.bind()


def serve_on_ray(args, engine_kwargs: dict, limits) -> int:
    """`mixres serve --engine ray`: run the replicas until SIGTERM / SIGINT, then shut Serve down.
    `engine_kwargs` and `limits` come from the command line (`mixres.serve.cli`)."""
    from mixres.embed.engines.ray_data import import_ray, start_ray

    ray = import_ray()
    from ray import serve

    start_ray(ray, args.ray_address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployment(engine_kwargs, api_key=args.api_key, limits=limits,
                         replicas=args.ray_replicas), name="mixres", route_prefix="/")
    print(f"mixres serve: {args.ray_replicas} Ray Serve replica(s) on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # each replica's app drains its engine as it stops
    ray.shutdown()
    return 0
