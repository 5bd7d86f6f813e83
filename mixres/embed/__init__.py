"""Images to features at scale: inputs, the runner, the on-disk store and its reader.

    mixres.encode(inputs, model=...)        in memory  (embed/runner.py)
    mixres.embed.embed(INPUT, OUT, model)   to shards on disk, resumable (`mixres embed`)
    mixres.read_features(OUT)               read a folder back (embed/reader.py)

inputs.py lists and decodes the inputs; state.py plans shards and checks a folder's
settings; store.py writes shards and the crash-safe journal; cli.py is `mixres embed`.
"""

from mixres.embed.reader import FeatureRecord, Features, read_features
from mixres.embed.runner import embed, encode

__all__ = ["embed", "encode", "read_features", "Features", "FeatureRecord"]
