"""Deterministic random-init models for demos, benchmarks and tests.

A preset is a name for an HF vision model built from a config with random weights. The
same name gives bitwise the same weights in every process: its builder runs on the CPU
under a fixed seed, inside a fork of the global RNG, so building a preset never disturbs
the caller's randomness. The config records `mixres_preset = name`, so a saved copy says
its weights are random.

    model = build("tiny-vit")              # eval mode
    mixres.load_model("tiny-clip")         # the same, by the general loader (mixres.loading)

Base-sized presets (`vit-b16`, `clip-b16`, `siglip-b16`, `siglip2-b16`, `dinov2-s14`) have
the published models' shapes, for throughput numbers; `tiny-*` (hidden 64, 2 layers) are
for tests.
"""

from __future__ import annotations

import difflib
import hashlib

import torch
import transformers as tf
from torch import nn

from mixres.registry import Registry

__all__ = ["PRESETS", "PRESET_SEED", "UnknownModelError", "build", "list_presets",
           "register_preset", "state_digest", "did_you_mean"]

PRESET_SEED = 0

# Presets defined by modules with heavy imports (vit-pytorch pulls in torchvision) are
# lazy entries: their module is imported the first time one of their names is asked for.
PRESETS = Registry("preset")
PRESETS.lazy("navit-b16", "mixres.models.navit")
PRESETS.lazy("tiny-navit", "mixres.models.navit")


class UnknownModelError(ValueError):
    """A model spec that is no preset, no local directory and nothing the hub could give."""


# registry

def register_preset(name: str):
    """Decorator: register `builder() -> model` under `name` (random init; `build` seeds it)."""
    return PRESETS.register(name)


def list_presets() -> list[str]:
    return PRESETS.names()


def build(name: str) -> nn.Module:
    """The preset `name` with its seeded random weights, in eval mode."""
    if name not in PRESETS:
        raise UnknownModelError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}."
                                + did_you_mean(name))
    builder = PRESETS.get(name)
    # Only the CPU generator is forked and seeded (torch.manual_seed would also reseed CUDA's
    # and leave it changed), so the weights are made on the CPU whatever the default device.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.random.default_generator.manual_seed(PRESET_SEED)
        model = builder()
    model.config.mixres_preset = name
    return model.eval()


def state_digest(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes, bytes): equal iff bitwise equal."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def did_you_mean(name: str) -> str:
    """" Did you mean 'x'?" for the nearest preset name, or ""."""
    close = difflib.get_close_matches(name, list_presets(), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# presets

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@register_preset("vit-b16")
def vit_b16():
    return tf.ViTModel(tf.ViTConfig(image_size=224, patch_size=16, **BASE),
                       add_pooling_layer=True)


@register_preset("clip-b16")
def clip_b16():
    return tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=224, patch_size=16,
                                                  projection_dim=512, **BASE))


@register_preset("siglip-b16")
def siglip_b16():
    return tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=224, patch_size=16, **BASE))


@register_preset("siglip2-b16")
def siglip2_b16():
    # NaFlex: a 16x16 grid of learned positions, resized to each image's own grid.
    return tf.Siglip2VisionModel(tf.Siglip2VisionConfig(num_patches=256, patch_size=16, **BASE))


@register_preset("dinov2-s14")
def dinov2_s14():
    # DINOv2 states its MLP width as a ratio (384 * 4 = 1536).
    return tf.Dinov2Model(tf.Dinov2Config(image_size=518, patch_size=14, hidden_size=384,
                                          num_hidden_layers=12, num_attention_heads=6,
                                          mlp_ratio=4))


@register_preset("tiny-vit")
def tiny_vit():
    return tf.ViTModel(tf.ViTConfig(image_size=64, patch_size=16, **TINY), add_pooling_layer=True)


@register_preset("tiny-clip")
def tiny_clip():
    return tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=64, patch_size=16,
                                                  projection_dim=64, **TINY))


@register_preset("tiny-siglip")
def tiny_siglip():
    return tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=64, patch_size=16, **TINY))


@register_preset("tiny-siglip2")
def tiny_siglip2():
    return tf.Siglip2VisionModel(tf.Siglip2VisionConfig(num_patches=16, patch_size=16, **TINY))


@register_preset("tiny-dinov2")
def tiny_dinov2():
    tiny = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    return tf.Dinov2Model(tf.Dinov2Config(image_size=56, patch_size=14, mlp_ratio=2, **tiny))


# NaViT presets (`navit-b16`, `tiny-navit`) are not defined here: the NaViT module registers
# them with `@register_preset(...)` when it is imported (vit-pytorch NaViT as an HF AutoModel),
# and the package imports that module, so they are listed with the others.
