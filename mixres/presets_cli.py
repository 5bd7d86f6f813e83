"""`mixres presets`: one line per preset, its class and shape (read on the meta device)."""

from __future__ import annotations

import torch

from mixres import vision_utils
from mixres.presets import PRESETS, list_presets

__all__ = ["describe", "add_arguments", "run"]


def describe(name: str) -> str:
    """One line: the preset's class and shape, read from a model built on the meta device."""
    with torch.device("meta"):
        model = PRESETS.get(name)()
    config = vision_utils.vision_config(model)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "depth", None)
    patch = getattr(config, "patch_size", None)
    return (f"{name:<13} {type(model).__name__:<20} width {vision_utils.image_encoder_size(model)}, "
            f"{layers} layers, patch {patch} (random weights)")


def add_arguments(p) -> None:
    p.description = ("Presets: HF vision models built from a config with seeded random weights "
                     "(the same name gives the same weights everywhere), for demos, tests and benchmarks.")


def run(args) -> int:
    for name in list_presets():
        print(describe(name))
    return 0
