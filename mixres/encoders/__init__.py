"""Encoder backends behind one registry: `load_encoder(model, backend=...)`.

Each backend lives in its own module and registers itself with `@register_backend`.
Modules are imported on first use, so a backend's optional dependencies (vit-pytorch
for NaViT) are only needed when that backend is asked for.
"""

from __future__ import annotations

import importlib

from mixres.encoders.base import Encoder

__all__ = ["Encoder", "register_backend", "load_encoder", "list_backends"]

_REGISTRY: dict[str, type[Encoder]] = {}

# where each built-in backend is defined (imported lazily)
_MODULES = {
    "packed": "mixres.encoders.packed",
    "loop": "mixres.encoders.loop",
    "navit": "mixres.encoders.navit",
    "grouped": "mixres.batch_image_encoder",
    "masked": "mixres.masked_vit_patcher",
}


def register_backend(name: str):
    """Class decorator: make an Encoder subclass available as `backend=name`."""
    def deco(cls: type[Encoder]) -> type[Encoder]:
        cls.backend = name
        _REGISTRY[name] = cls
        return cls
    return deco


def list_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_MODULES))


def get_backend(name: str) -> type[Encoder]:
    if name not in _REGISTRY and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {list_backends()}")
    return _REGISTRY[name]


def load_encoder(model, backend: str = "packed", **kwargs) -> Encoder:
    """An encoder for `model` (an nn.Module, a local path, a hub id or a preset name).

    kwargs go to the backend: select_layer, max_batch_tokens, dtype, device,
    min_image_tokens / max_image_tokens (preprocessing of PIL images and paths), ...
    """
    from mixres.presets import load_model

    cls = get_backend(backend)
    return cls(load_model(model), **kwargs)
