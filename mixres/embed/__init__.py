"""Images to features at scale: inputs, the runner, the on-disk store and its reader.

    mixres.encode(inputs, model=...)        in memory  (mixres/encoders: the library call)
    mixres.embed.embed(INPUT, OUT, model)   to shards on disk, resumable (`mixres embed`)
    mixres.read_features(OUT)               read a folder back (embed/reader.py)

sources/ lists INPUT (files, webdataset tars, parquet, datasets folders) with stable keys
and reads one item's bytes; inputs.py decodes items in DataLoader workers; state.py plans
shards and checks a folder's settings and source; store.py writes shards, pooled/,
metadata/ and the crash-safe journal; lock.py keeps one writer per folder; verify.py is
`mixres verify`; cli.py is `mixres embed`. ray_engine.py is `--engine ray`: the same
per-shard step (runner.finish_shard) in Ray Data encoder actors fed by decode tasks.
"""

# name -> module that defines it, imported on first attribute access: `mixres.encode` reads
# sources (mixres.embed.sources), which must not pull the batch job (runner) in with them
_LAZY = {"embed": "mixres.embed.runner", "encode": "mixres.encoders",
         "read_features": "mixres.embed.reader", "Features": "mixres.embed.reader",
         "FeatureRecord": "mixres.embed.reader"}

__all__ = ["embed", "encode", "read_features", "Features", "FeatureRecord"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mixres.embed' has no attribute {name!r}")
