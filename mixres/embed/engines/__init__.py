"""Engines of `mixres embed`: each only encodes the shards the driver gives it and journals them.

    local  this process encodes, DataLoader workers decode; under torchrun every rank runs
           the driver and this engine on its share of the shards (engines/local.py)
    ray    Ray Data decode tasks feed encoder actors that each hold the model (engines/ray_data.py)

An engine is a class taking the `EmbedConfig`, with
    start() -> DistInfo          the driver's process group (one process, or torchrun's ranks)
    device(group)                where the driver loads its encoder (the settings come from it)
    run(job: Job) -> dict        images, tokens, errors, shards, encoder_seconds, encoders,
                                 stream_seconds (from the first loaded model to the last shard)
    close()
Everything else (lock, plan, resume, merge, summary) is the driver's (`mixres.embed.driver`).
"""

from mixres.registry import Registry

__all__ = ["ENGINES"]

ENGINES = Registry("embed engine")
ENGINES.lazy("local", "mixres.embed.engines.local")
ENGINES.lazy("ray", "mixres.embed.engines.ray_data")
