"""Images to features at scale: inputs, the driver and its engines, the on-disk store, its reader.

    mixres.encode(inputs, model=...)        in memory  (mixres/encoders: the library call)
    mixres.embed.embed(INPUT, OUT, model)   to shards on disk, resumable (`mixres embed`)
    mixres.read_features(OUT)               read a folder back (embed/reader.py)

config.py is `EmbedConfig`, every setting once (the CLI, the library, the fingerprint);
sources/ lists INPUT (files, webdataset tars, parquet, datasets folders) with stable keys
and reads one item's bytes; inputs.py decodes items in workers; driver.py is the one
driver (lock, plan, resume, merge); engines/ encode the shards it gives them (local +
torchrun, Ray) with shards.py's `ShardWriter`; state.py records and checks a folder's
settings; store.py writes shards, pooled vectors, metadata and the crash-safe journal;
lock.py keeps one writer per folder; verify.py is `mixres verify`; cli.py is `mixres embed`.
"""

from mixres.registry import lazy_attributes

# name -> module that defines it, imported on first attribute access: `mixres.encode` reads
# sources (mixres.embed.sources), which must not pull the batch job (driver) in with them
_LAZY = {"embed": "mixres.embed.driver", "EmbedConfig": "mixres.embed.config",
         "encode": "mixres.encoders", "read_features": "mixres.embed.reader",
         "Features": "mixres.embed.reader", "FeatureRecord": "mixres.embed.reader"}

__all__ = ["embed", "encode", "read_features", "EmbedConfig", "Features", "FeatureRecord"]

__getattr__ = lazy_attributes(__name__, _LAZY)
