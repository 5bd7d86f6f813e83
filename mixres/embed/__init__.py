"""Images to features at scale: inputs, the runner, the on-disk store and its reader.

    mixres.encode(inputs, model=...)        in memory  (embed/runner.py)
    mixres.embed.embed(INPUT, OUT, model)   to shards on disk, resumable (`mixres embed`)
    mixres.read_features(OUT)               read a folder back (embed/reader.py)

sources/ lists INPUT (files, webdataset tars, parquet, datasets folders) with stable keys
and reads one item's bytes; inputs.py decodes items in DataLoader workers; state.py plans
shards and checks a folder's settings and source; store.py writes shards, pooled/,
metadata/ and the crash-safe journal; lock.py keeps one writer per folder; verify.py is
`mixres verify`; cli.py is `mixres embed`. ray_engine.py is `--engine ray`: the same
per-shard step (runner.finish_shard) in Ray Data encoder actors fed by decode tasks.
"""

from mixres.embed.reader import FeatureRecord, Features, read_features
from mixres.embed.runner import embed, encode

__all__ = ["embed", "encode", "read_features", "Features", "FeatureRecord"]
