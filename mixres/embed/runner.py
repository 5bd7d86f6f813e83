"""Images to features in memory: `mixres.encode`, and the encoder `mixres embed` builds.

`encode(inputs, model=...)` runs an encoder on paths, PIL images or tensors (or every
item of a source `mixres embed` reads) and pools as asked. Writing features to disk at
scale is `mixres.embed.driver`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mixres.embed.sources import IMAGE_EXTENSIONS, Source, open_source
from mixres.packing import PackedFeatures, check_pool, pool_features
from mixres.renamed import IMAGE_TOKENS, resolve_renamed

__all__ = ["encode", "make_encoder", "resolve_pool"]


# the encoder

def make_encoder(model, *, backend: str = "packed", **kwargs):
    """An Encoder from an Encoder (used as it is), an nn.Module, a path, a hub id or a preset."""
    from mixres.encoders import Encoder, get_backend, load_encoder

    if isinstance(model, Encoder):
        return model
    if isinstance(model, nn.Module):
        return get_backend(backend)(model, **kwargs)
    return load_encoder(model, backend=backend, **kwargs)


def encode(inputs, model, *, backend: str = "packed", select_layer: int = -1, pool: str | None = None,
           min_image_tokens: int = 1, max_image_tokens: int | None = 1024,
           max_batch_tokens: int | str | None = "auto", device=None, dtype=None, **renamed) -> PackedFeatures:
    """Encode paths, PIL images or (C, H, W) tensors; PackedFeatures with `pooled` as asked.

    inputs  a list of images, one image, or a source `mixres embed` reads (.tar shards,
            parquet, a datasets folder, a folder or list of files): all its items, in order
    model  an HF model, an Encoder (then the encoder's own settings apply), a local
           directory, a hub id or a preset name
    pool   "model" (the model's pooler), "cls", "mean" (over patch tokens only), "none";
           None (the default) follows the layer: "model" for select_layer=-1, else "cls"
           where the model has a CLS token, else "mean" (`mixres.packing.default_pool`)
    """
    min_image_tokens, max_image_tokens = resolve_renamed(
        renamed, IMAGE_TOKENS, "mixres.encode", min_image_tokens=min_image_tokens,
        max_image_tokens=max_image_tokens)
    check_pool(pool, select_layer)
    enc = make_encoder(model, backend=backend, select_layer=select_layer, min_image_tokens=min_image_tokens,
                       max_image_tokens=max_image_tokens, max_batch_tokens=max_batch_tokens, device=device,
                       dtype=dtype)
    pool = resolve_pool(pool, enc)
    if isinstance(inputs, (str, os.PathLike, Source)) and not _is_image_file(inputs):
        inputs = _read_all(open_source(inputs))
    elif isinstance(inputs, (str, os.PathLike, torch.Tensor)) or hasattr(inputs, "mode"):
        inputs = [inputs]
    return pool_features(enc.encode(list(inputs)), pool)


def resolve_pool(pool: str | None, enc) -> str:
    """`pool` checked against the encoder's select_layer (an Encoder passed in keeps its own);
    None becomes the default that follows the layer."""
    try:
        num_prefix = enc.num_prefix
    except ValueError:  # a family mixres has no file for: no prefix tokens known
        num_prefix = 0
    return check_pool(pool, enc.select_layer, num_prefix)


def _is_image_file(x) -> bool:
    return not isinstance(x, Source) and Path(x).suffix.lower() in IMAGE_EXTENSIONS


def _read_all(src: Source) -> list[bytes]:
    """Every item's encoded bytes (in memory: `encode` is for what fits; `embed` streams)."""
    out = []
    for pos, key in enumerate(src.keys):
        try:
            out.append(src.read(pos)[0])
        except ValueError as e:
            raise ValueError(f"{src.unit_of(pos)}: {key}: {e}") from None
    return out
