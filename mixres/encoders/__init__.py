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

from mixres.encoders.base import Encoder, resolve_layer
from mixres.registry import Registry

__all__ = ["BACKENDS", "Encoder", "register_encoder_backend", "load_encoder", "list_backends",
           "get_backend", "resolve_layer"]

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

    kwargs go to the backend: select_layer, max_batch_tokens, dtype, device,
    min_image_tokens / max_image_tokens (preprocessing of PIL images and paths), ...
    """
    from mixres.loading import load_model

    cls = get_backend(backend)
    return cls(load_model(model, model_kwargs=model_kwargs), **kwargs)
