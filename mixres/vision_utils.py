"""Introspection of heterogeneous vision backbones: the seed-compatible face of `mixres.families`.

HF vision models state the same facts in different places: the width of what they output
(`hidden_size`, `hidden_sizes[-1]`, MobileViT's `neck_hidden_sizes`), how many tokens come
before the patches (CLS, DeiT's distillation token, DINOv2/v3 registers), whether their
forward can interpolate position embeddings, and how their images are normalized. What a
config does not say is in the family's spec (`mixres/families/<family>.py`); this module
reads the config and asks the spec for the rest.

Results that depend only on a model instance are computed once per instance (a weak
cache of pure facts): configs are not expected to change after the model is built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from torch import nn

from mixres.families import (
    FAMILIES,
    accepts,
    family,
    family_spec,
    forward_kwargs,
    model_args_dict,
    num_prefix_tokens,
    spec_of,
    vision_config,
    vision_tower,
)
from mixres.families.siglip2 import naflex_patches
from mixres.families.spec import (
    IMAGENET_DEFAULT,
    IMAGENET_STANDARD,
    NO_NORMALIZATION,
    OPENAI_CLIP,
    MeanStd,
    UnknownImageEncoderError,
    per_model,
)

__all__ = [
    "UnknownImageEncoderError",
    "accepts",
    "family",
    "forward_kwargs",
    "hidden_size",
    "image_encoder_size",
    "image_mean_std",
    "model_args_dict",
    "naflex_patches",
    "num_prefix_tokens",
    "patch_size",
    "pool_hidden_dim",
    "vision_config",
    "vision_tower",
    "IMAGENET_DEFAULT", "IMAGENET_STANDARD", "OPENAI_CLIP", "NO_NORMALIZATION",
]


def _name(model) -> str:
    return type(model).__name__


# width

def _embed_dim_width(config, tower) -> int:
    depths = getattr(config, "depths", None)
    return int(config.embed_dim) * 2 ** (len(depths) - 1 if depths else 0)


def _mobilevit_width(config, tower) -> int:
    # MobileViTModel(expand_output=False) (the segmentation backbone) skips the final 1x1
    # expansion conv, so it outputs the last stage's channels instead. It is a constructor
    # argument, not a config field, hence the per-instance cache.
    return int(config.neck_hidden_sizes[-1 if getattr(tower, "expand_output", True) else -2])


# How configs state the channel width of last_hidden_state, tried in order. MobileViT's neck
# rule comes before `hidden_sizes`, which MobileViT also has (its transformer widths).
_WIDTH_RULES: tuple[tuple[str, Callable], ...] = (
    ("hidden_size", lambda config, tower: int(config.hidden_size)),  # ViTs; Swin's final width
    ("neck_hidden_sizes", _mobilevit_width),
    ("hidden_sizes", lambda config, tower: int(config.hidden_sizes[-1])),  # ResNet, ConvNeXt
    ("embed_dim", _embed_dim_width),  # Swin-like configs without hidden_size
)


@per_model
def image_encoder_size(model: nn.Module) -> int:
    """Channel width of what the vision encoder outputs (last_hidden_state's feature dim).

    For a whole CLIP/SigLIP model it is the vision tower's width.
    """
    spec = spec_of(model)
    if spec is not None and spec.hidden_size is not None:
        return spec.hidden_size(vision_tower(model))
    config, tower = vision_config(model), vision_tower(model)
    for attr, rule in _WIDTH_RULES:
        if getattr(config, attr, None) is not None:
            return rule(config, tower)
    raise UnknownImageEncoderError(
        f"{_name(model)}: cannot tell its output width; its vision config "
        f"({type(config).__name__}) has none of {', '.join(a for a, _ in _WIDTH_RULES)}")


hidden_size = image_encoder_size


# patches and prefix tokens

@per_model
def patch_size(model: nn.Module) -> int | None:
    """Side in pixels of the square patch that becomes one token; None for CNNs."""
    spec = spec_of(model)
    if spec is not None and spec.patch_size is not None:
        return spec.patch_size(vision_tower(model))
    if spec is not None and not spec.patch_tokens:
        return None
    value = getattr(vision_config(model), "patch_size", None)
    if value is None:
        raise UnknownImageEncoderError(
            f"{_name(model)} (model_type {family(model)!r}): its vision config has no `patch_size`")
    if isinstance(value, int):
        return value
    sides = {int(v) for v in value}
    if len(sides) != 1:
        raise ValueError(f"{_name(model)}: patch_size {tuple(value)} is not square; mixres "
                         "cuts images into square patches")
    return sides.pop()


# normalization

def _local_dir(model_or_path) -> Path | None:
    if isinstance(model_or_path, str | os.PathLike):
        name = os.fspath(model_or_path)
    else:
        name = getattr(model_or_path, "name_or_path", None) or getattr(
            getattr(model_or_path, "config", None), "_name_or_path", None)
    if name and os.path.isdir(name):
        return Path(name)
    return None


def _saved_file(model_or_path, filename: str) -> Path | None:
    """A file saved with the model: in its local dir, else in the HF cache (never the network)."""
    local = _local_dir(model_or_path)
    if local is not None:
        path = local / filename
        return path if path.is_file() else None
    name = model_or_path if isinstance(model_or_path, str) else getattr(
        model_or_path, "name_or_path", None)
    if not name:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(name, filename)
    except Exception:  # not a valid repo id: nothing cached under it
        return None
    return Path(hit) if isinstance(hit, str) else None


def _triple(value, what: str, where: Path) -> tuple[float, ...]:
    values = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) not in (1, 3):
        raise ValueError(f"{where}: {what} should have 1 or 3 entries, got {value!r}")
    return tuple(values * 3 if len(values) == 1 else values)


def _processor_class_defaults(cfg: dict) -> dict:
    # A saved processor leaves out what its class defaults to; MobileViT's do_normalize is
    # None (off), so its JSON says nothing about normalization at all.
    name = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or ""
    name = name.replace("FeatureExtractor", "ImageProcessor")
    if not name:
        return {}
    cls = getattr(transformers, name, None)
    if cls is None:  # v4 saved fast processors as "...ImageProcessorFast"
        cls = getattr(transformers, name.removesuffix("Fast"), None)
    return {key: getattr(cls, key) for key in ("do_normalize", "image_mean", "image_std")
            if hasattr(cls, key)}


def _read_mean_std(path: Path, fallback: Callable[[], MeanStd]) -> MeanStd:
    saved = json.loads(path.read_text())
    cfg = {**_processor_class_defaults(saved), **saved}
    if not cfg.get("do_normalize", True):
        return NO_NORMALIZATION
    if cfg.get("image_mean") is None or cfg.get("image_std") is None:
        return fallback()
    return (_triple(cfg["image_mean"], "image_mean", path),
            _triple(cfg["image_std"], "image_std", path))


def image_mean_std(model_or_path) -> MeanStd:
    """(mean, std) per channel that the model's images are normalized with.

    From the preprocessor_config.json saved with the model (a local directory, given or
    recorded as the model's name_or_path, or a hub id already in the HF cache); otherwise
    the family's default (its spec's `mean_std_of(tower)` or `mean_std`).
    """
    def family_default() -> MeanStd:
        if isinstance(model_or_path, nn.Module):
            spec = family_spec(model_or_path, "image normalization")
            if spec.mean_std_of is not None:  # per model: timm pretrained_cfg, open_clip preprocess
                return spec.mean_std_of(vision_tower(model_or_path))
            return spec.mean_std
        config_file = _saved_file(model_or_path, "config.json")
        if config_file is None:
            raise UnknownImageEncoderError(
                f"{os.fspath(model_or_path)!r}: no preprocessor_config.json or config.json found "
                "there, so its image normalization is unknown")
        config = json.loads(config_file.read_text())
        config = config.get("vision_config") or config
        key = str(config.get("model_type", "")).removesuffix("_vision_model")
        if key not in FAMILIES:
            raise UnknownImageEncoderError(
                f"{config_file}: model_type {key!r} has no preprocessor_config.json and no "
                f"default normalization; known families: {', '.join(FAMILIES.names())}")
        return FAMILIES.get(key).mean_std

    path = _saved_file(model_or_path, "preprocessor_config.json")
    return _read_mean_std(path, family_default) if path is not None else family_default()


# pooling

def pool_hidden_dim(tensor: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """Mean over every dim except batch (0) and the feature dim -> (B, hidden_size).

    The feature dim is the one of size hidden_size: tokens (B, L, D) -> (B, D), a CNN's
    feature map (B, C, h, w) -> (B, C). When several dims match, HF's layouts decide
    (last for 3-D tokens, 1 for 4-D NCHW maps).
    """
    dims = [d for d in range(1, tensor.ndim) if tensor.shape[d] == hidden_size]
    conventional = {3: tensor.ndim - 1, 4: 1}.get(tensor.ndim)
    if conventional in dims:
        feature = conventional
    elif len(dims) == 1:
        feature = dims[0]
    elif not dims:
        raise ValueError(f"pool_hidden_dim: no dim of {tuple(tensor.shape)} (after batch) has "
                         f"size hidden_size={hidden_size}")
    else:
        raise ValueError(f"pool_hidden_dim: dims {dims} of {tuple(tensor.shape)} all have size "
                         f"{hidden_size}; cannot tell which is the feature dim")
    others = [d for d in range(1, tensor.ndim) if d != feature]
    return tensor.mean(dim=others) if others else tensor
