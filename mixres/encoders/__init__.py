"""Encoder backends behind one registry: `load_encoder(model, backend=...)`.

Each backend lives in its own module here and registers itself in `BACKENDS` (a
`mixres.registry.Registry`); the modules are lazy entries, imported on first use, so a
backend's optional dependencies are only needed when that backend is asked for.

    packed   HF ViT-family models run patch-n-pack, the family's packed recipe
    navit    vit-pytorch NaViT / mixres NaViTModel run packed
    grouped  any model, run whole on same-shape batches (exact by construction)
    masked   HF ViT padded to the largest image with per-image positions and masks
    loop     the reference: the unmodified model on each image alone
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mixres.encoders.base import Encoder, resolve_layer
from mixres.packing import PackedFeatures, check_pool, pool_features
from mixres.registry import Registry
from mixres.renamed import IMAGE_TOKENS, resolve_renamed

__all__ = ["BACKENDS", "Encoder", "register_encoder_backend", "load_encoder", "encode", "make_encoder",
           "resolve_pool", "list_backends", "get_backend", "resolve_layer"]

BACKENDS = Registry("encoder backend")
for _name in ("packed", "navit", "grouped", "masked", "loop"):
    BACKENDS.lazy(_name, f"mixres.encoders.{_name}")


def register_encoder_backend(name: str):
    """Class decorator: make an Encoder subclass available as `backend=name`."""
    def deco(cls: type[Encoder]) -> type[Encoder]:
        cls.backend = name
        return BACKENDS.register(name, cls)
    return deco


def list_backends() -> list[str]:
    return BACKENDS.names()


def get_backend(name: str) -> type[Encoder]:
    return BACKENDS.get(name)


def load_encoder(model, backend: str = "packed", *, model_kwargs: dict | None = None, **kwargs) -> Encoder:
    """An encoder for `model` (an nn.Module, a local path, a hub id, a preset name, `timm:<name>`,
    `open_clip:<arch>`; `model_kwargs` go to timm's / open_clip's create_model).

    kwargs go to the backend: select_layer, max_batch_tokens, dtype, device, decode
    ("pil" | "fast" | "cuda") and min_image_tokens / max_image_tokens (the `Preprocessor` of
    everything that is not a ready tensor), ...
    """
    from mixres.loading import load_model

    cls = get_backend(backend)
    return cls(load_model(model, model_kwargs=model_kwargs), **kwargs)


def make_encoder(model, *, backend: str = "packed", **kwargs) -> Encoder:
    """An Encoder from an Encoder (used as it is), an nn.Module, a path, a hub id or a preset."""
    if isinstance(model, Encoder):
        return model
    if isinstance(model, nn.Module):
        return get_backend(backend)(model, **kwargs)
    return load_encoder(model, backend=backend, **kwargs)


def encode(inputs, model, *, backend: str = "packed", select_layer: int = -1, pool: str | None = None,
           decode: str = "pil", min_image_tokens: int = 1, max_image_tokens: int | None = 1024,
           max_batch_tokens: int | str | None = "auto", device=None, dtype=None, **renamed) -> PackedFeatures:
    """Encode images in one call, under inference mode; PackedFeatures with `pooled` as asked.

    inputs  one image or a list: anything `mixres.preprocess.Preprocessor` takes (paths, bytes,
            PIL images, numpy arrays or tensors of pixels, ready (C, H, W) tensors), or a source
            `mixres embed` reads (.tar shards, parquet, a datasets folder, a folder or list of
            files): all its items, in order. An empty list gives empty features.
    model   an HF model, an Encoder (then the encoder's own settings apply), a local
            directory, a hub id or a preset name
    pool    "model" (the model's pooler), "cls", "mean" (over patch tokens only:
            `mixres.packing.mean_pool`), "none"; None (the default) follows the layer: "model"
            for select_layer=-1, else "cls" where the model has a CLS token, else "mean"
    decode  "pil" (the reference), "fast" or "cuda" (`mixres.decode`)

    Like sentence-transformers' `encode`, it never tracks gradients, so its tensors convert
    to numpy directly (`np.asarray(feats.pooled)`); for gradients, call `Encoder.encode`.
    """
    min_image_tokens, max_image_tokens = resolve_renamed(
        renamed, IMAGE_TOKENS, "mixres.encode", min_image_tokens=min_image_tokens,
        max_image_tokens=max_image_tokens)
    check_pool(pool, select_layer)
    enc = make_encoder(model, backend=backend, select_layer=select_layer, min_image_tokens=min_image_tokens,
                       max_image_tokens=max_image_tokens, max_batch_tokens=max_batch_tokens, device=device,
                       dtype=dtype, decode=decode)
    pool = resolve_pool(pool, enc)
    if _is_source(inputs):
        inputs = _read_all(inputs)
    with torch.inference_mode():
        return pool_features(enc.encode(inputs, grad=False), pool)


def resolve_pool(pool: str | None, enc: Encoder) -> str:
    """`pool` checked against the encoder's select_layer (an Encoder passed in keeps its own);
    None becomes the default that follows the layer."""
    try:
        num_prefix = enc.num_prefix
    except ValueError:  # a family mixres has no file for: no prefix tokens known
        num_prefix = 0
    return check_pool(pool, enc.select_layer, num_prefix)


def _is_source(x) -> bool:
    """A folder, a list file, shards...: what `mixres embed` reads, not one image file."""
    from mixres.embed.sources import IMAGE_EXTENSIONS, Source

    if isinstance(x, Source):
        return True
    return isinstance(x, (str, os.PathLike)) and os.path.splitext(x)[1].lower() not in IMAGE_EXTENSIONS


def _read_all(inputs) -> list[bytes]:
    """Every item's encoded bytes (in memory: `encode` is for what fits; `embed` streams)."""
    from mixres.embed.sources import open_source

    src = open_source(inputs)
    out = []
    for pos, key in enumerate(src.keys):
        try:
            out.append(src.read(pos)[0])
        except ValueError as e:
            raise ValueError(f"{src.unit_of(pos)}: {key}: {e}") from None
    return out
