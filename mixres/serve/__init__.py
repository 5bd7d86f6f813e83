"""`mixres serve`: an embedding server that packs concurrent requests' images, each at its own size.

    from mixres.serve import Engine, create_app
    engine = Engine("tiny-vit")                 # in-process: engine.start(); await engine.embed(images)
    app = create_app(engine, api_key="secret")  # the ASGI app `mixres serve` runs on uvicorn

Parts: engine.py (the loop that owns the model), queue.py (token-measured fair batching),
decoding.py (bytes -> tensors in worker processes), schemas.py (OpenAI's wire format),
routes.py / app.py / auth.py / errors.py (HTTP), metrics.py (Prometheus), cli.py (the
command), ray_replica.py (Ray Serve replicas). See docs/serve.md.
"""

from mixres.serve.app import create_app
from mixres.serve.auth import require_api_key
from mixres.serve.engine import Embedding, Engine, EngineError, InputError, Overloaded, TooLarge, Unavailable
from mixres.serve.routes import Limits, served

__all__ = ["Engine", "Embedding", "create_app", "require_api_key", "served", "Limits", "EngineError",
           "InputError", "Overloaded", "TooLarge", "Unavailable"]
