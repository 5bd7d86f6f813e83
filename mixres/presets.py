"""Deterministic random-init models for demos, benchmarks and tests.

A preset is a name for an HF vision model built from a config with random weights. The
same name gives bitwise the same weights in every process: its builder runs on the CPU
under a fixed seed, inside a fork of the global RNG, so building a preset never disturbs
the caller's randomness. The config records `mixres_preset = name`, so a saved copy says
its weights are random.

    model = build("tiny-vit")              # eval mode
    model = load_model("tiny-clip")        # or an nn.Module, a local directory, a hub id

Base-sized presets (`vit-b16`, `clip-b16`, `siglip-b16`, `siglip2-b16`, `dinov2-s14`) have
the published models' shapes, for throughput numbers; `tiny-*` (hidden 64, 2 layers) are
for tests.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os

import torch
import transformers as tf
from torch import nn

from mixres.registry import Registry

__all__ = ["PRESETS", "PRESET_SEED", "UnknownModelError", "build", "list_presets",
           "load_model", "register_preset", "state_digest"]

PRESET_SEED = 0

# Presets defined by modules with heavy imports (vit-pytorch pulls in torchvision) are
# lazy entries: their module is imported the first time one of their names is asked for.
PRESETS = Registry("preset")
PRESETS.lazy("navit-b16", "mixres.models.navit")
PRESETS.lazy("tiny-navit", "mixres.models.navit")
# model types registered with AutoConfig by a mixres module, imported before from_pretrained
MODEL_TYPES = Registry("model type")
MODEL_TYPES.lazy("navit", "mixres.models.navit")


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
                                + _did_you_mean(name))
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


# loading

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def load_model(spec, *, trust_remote_code: bool = False, model_kwargs: dict | None = None) -> nn.Module:
    """An nn.Module as it is; a preset name -> `build`; a local directory or a hub id ->
    `AutoModel.from_pretrained` (a whole CLIP/SigLIP stays whole: see vision_utils.vision_tower);
    `timm:<name>`, `hf-hub:timm/...`, `open_clip:<arch>[:<pretrained>]` -> timm / open_clip
    (`mixres.timm_models`; `model_kwargs` go to their factory).

    With HF_HUB_OFFLINE=1 a hub id is looked up in the local cache only, so a machine
    without network fails at once instead of after the hub client's retries.
    """
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(f"load_model: expected an nn.Module, a preset name, a local directory "
                        f"or a hub id, got {type(spec).__name__}")
    name = os.fspath(spec)
    from mixres.timm_models import is_library_spec, load_library_model

    if is_library_spec(name):
        return load_library_model(name, **(model_kwargs or {}))
    if model_kwargs:
        raise ValueError(f"model_kwargs are for timm: / open_clip: models, not {name!r}")
    if name in PRESETS:
        return build(name)
    if os.path.isdir(name):
        model_type = _saved_model_type(name)
        if model_type in MODEL_TYPES:
            MODEL_TYPES.get(model_type)
        return tf.AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
    near = _did_you_mean(name)
    if near and "/" not in name:
        # a typo of a preset: say so at once instead of asking the Hub about it first
        raise UnknownModelError(f"{name!r} is neither a mixres preset nor a local directory. Presets: "
                                f"{', '.join(list_presets())}.{near} (A hub id is spelled org/name.)")
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    unreachable = None if offline else _hub_unreachable()
    if unreachable:
        offline = True  # the cache may still have it; the hub client would retry for many seconds
    try:
        return tf.AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code,
                                            local_files_only=offline)
    except OSError as err:  # huggingface_hub's not-found / no-connection / bad-id errors
        why = (f"the Hub is unreachable ({unreachable}) and it is not in the local cache" if unreachable
               else "HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise UnknownModelError(
            f"{name!r} is neither a mixres preset nor a local directory, and the Hugging Face "
            f"Hub could not provide it ({why}). Presets: {', '.join(list_presets())}."
            + _did_you_mean(name)) from None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub's host cannot be reached (one TCP connect, at most `timeout` s), or None."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or type(e).__name__}"
    return None


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list_presets(), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _saved_model_type(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None


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


# `mixres presets`

def describe(name: str) -> str:
    """One line: the preset's class and shape, read from a model built on the meta device."""
    from mixres import vision_utils

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
