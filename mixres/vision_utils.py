"""Introspection of heterogeneous HF vision backbones.

HF vision models state the same facts in different places: the width of what they output
(`hidden_size`, `hidden_sizes[-1]`, MobileViT's `neck_hidden_sizes`), how many tokens come
before the patches (CLS, DeiT's distillation token, DINOv2/v3 registers), whether their
forward can interpolate position embeddings, and how their images are normalized. This is
the one module that knows; everything else in mixres asks here instead of checking types.

Families whose config does not say everything are rows in `FAMILIES` (keyed by the
vision config's `model_type`); everything the config does say is read from it. Supported:
ViT, DeiT, CLIP, SigLIP, SigLIP2, DINOv2, DINOv2-with-registers, DINOv3 (ViT and ConvNeXt),
ConvNeXt (v1, v2), ResNet, Swin (v1, v2), MobileViT — as bare backbones, as whole
CLIP/SigLIP models and as `*ForImageClassification` heads.

Results that depend only on a model instance are computed once per instance (a weak
cache): HF configs are not expected to change after the model is built.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

__all__ = [
    "FAMILIES",
    "Family",
    "UnknownImageEncoderError",
    "accepts",
    "family",
    "forward_kwargs",
    "hidden_size",
    "image_encoder_size",
    "image_mean_std",
    "model_args_dict",
    "num_prefix_tokens",
    "patch_size",
    "pool",
    "pool_hidden_dim",
    "vision_config",
    "vision_tower",
]

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


class UnknownImageEncoderError(ValueError):
    """The model does not expose something mixres needs, in any form mixres knows."""


# normalization constants (HF `image_utils` names)

IMAGENET_DEFAULT: MeanStd = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_STANDARD: MeanStd = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP: MeanStd = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
NO_NORMALIZATION: MeanStd = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


# families

def _cls_only(config) -> int:
    return 1


def _no_prefix(config) -> int:
    return 0


def _cls_and_distillation(config) -> int:
    return 2


def _cls_and_registers(config) -> int:
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


@dataclass(frozen=True)
class Family:
    """What mixres must know about a vision family that its config does not say.

    mean_std: the normalization its published checkpoints ship in preprocessor_config.json
        (used only when no preprocessor_config.json can be found for the model).
    prefix_tokens: config -> number of tokens before the patches in last_hidden_state.
    patch_tokens: False for CNNs, whose output grid comes from a stack of strided convs;
        `patch_size` is then None even where the config has a `patch_size` (ConvNeXt's stem,
        MobileViT's unfold size), because no pixel patch maps to one output token.
    """

    mean_std: MeanStd
    prefix_tokens: Callable = _no_prefix
    patch_tokens: bool = True


# Keyed by the vision config's model_type with HF's "_vision_model" suffix dropped, so a whole
# CLIPModel and a CLIPVisionModel are both "clip". Extend it to teach mixres a new family.
# mean/std follow the checkpoints, not HF's processor-class defaults, where the two differ:
# DeiT, ResNet, ConvNeXt and Swin checkpoints ship ImageNet statistics although today's
# DeiT/ConvNext/ViT image-processor classes default to 0.5, and DINOv2's BitImageProcessor
# defaults to the OpenAI CLIP statistics.
FAMILIES: dict[str, Family] = {
    "vit": Family(IMAGENET_STANDARD, _cls_only),
    # HF's DeiTEmbeddings always prepends a distillation token after CLS (non-distilled DeiT
    # checkpoints are plain "vit" configs).
    "deit": Family(IMAGENET_DEFAULT, _cls_and_distillation),
    "clip": Family(OPENAI_CLIP, _cls_only),
    "siglip": Family(IMAGENET_STANDARD),
    "siglip2": Family(IMAGENET_STANDARD),
    "dinov2": Family(IMAGENET_DEFAULT, _cls_only),
    "dinov2_with_registers": Family(IMAGENET_DEFAULT, _cls_and_registers),
    "dinov3_vit": Family(IMAGENET_DEFAULT, _cls_and_registers),
    # DINOv3ConvNextModel flattens its last feature map to tokens and prepends the
    # average-pooled one as a CLS-like token: (B, 1 + h*w, C).
    "dinov3_convnext": Family(IMAGENET_DEFAULT, _cls_only, patch_tokens=False),
    "convnext": Family(IMAGENET_DEFAULT, patch_tokens=False),
    "convnextv2": Family(IMAGENET_DEFAULT, patch_tokens=False),
    "resnet": Family(IMAGENET_DEFAULT, patch_tokens=False),
    # Swin's tokens are merged 2x2 at every stage: one output token covers
    # patch_size * 2**(len(depths) - 1) pixels per side, with no prefix.
    "swin": Family(IMAGENET_DEFAULT),
    "swinv2": Family(IMAGENET_DEFAULT),
    # MobileViT's processor does not normalize (it flips RGB -> BGR instead, which is not a
    # mean/std matter and is left to the caller).
    "mobilevit": Family(NO_NORMALIZATION, patch_tokens=False),
}


# helpers

def _name(model) -> str:
    return type(model).__name__


def _per_model(fn):
    """Memoize fn(model) per model instance; errors are not cached."""
    cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @functools.wraps(fn)
    def cached(model):
        try:
            return cache[model]
        except (KeyError, TypeError):  # TypeError: not weak-referenceable / hashable
            pass
        value = fn(model)
        try:
            cache[model] = value
        except TypeError:
            pass
        return value

    return cached


# towers and configs

# Attributes under which HF wrappers keep their vision backbone, tried in order and followed
# until none applies: whole CLIP/SigLIP models and older CLIPVisionModel/SiglipVisionModel
# (`vision_model`), VLMs (`vision_tower`).
_TOWER_ATTRS: tuple[str, ...] = ("vision_model", "vision_tower")


def _tower_child(model: nn.Module) -> nn.Module | None:
    # Task heads keep their backbone under HF's `base_model_prefix` (`.vit`, `.dinov2`, ...),
    # tried last. A child counts only if it takes the images: bare DINOv3 models keep their
    # encoder (a PreTrainedModel taking hidden_states) under that same name ("model").
    prefix = getattr(model, "base_model_prefix", None)
    for attr in (*_TOWER_ATTRS, prefix) if prefix else _TOWER_ATTRS:
        child = getattr(model, attr, None)
        if isinstance(child, nn.Module) and child is not model and accepts(child, "pixel_values"):
            return child
    return None


def vision_tower(model: nn.Module) -> nn.Module:
    """The module that runs the vision backbone: the model itself for a bare backbone.

    Whole CLIPModel / SiglipModel / Siglip2Model -> `.vision_model`; `*ForImageClassification`
    -> its base model. The tower's forward takes `pixel_values` (see `forward_kwargs`).
    """
    for _ in range(8):  # wrappers nest a few levels at most; never loop on a cycle
        child = _tower_child(model)
        if child is None:
            break
        model = child
    return model


def vision_config(model: nn.Module):
    """The config that describes the vision tower (`config.vision_config` when present)."""
    config = getattr(vision_tower(model), "config", None)
    if config is None:
        config = getattr(model, "config", None)
    if config is None:
        raise UnknownImageEncoderError(
            f"{_name(model)} has no `config`; mixres reads vision models through their HF config")
    inner = getattr(config, "vision_config", None)
    return config if inner is None else inner


@_per_model
def family(model: nn.Module) -> str:
    """Short family key from the vision config's model_type: "vit", "clip", "dinov3_vit", ...

    A family mixres has no row for is returned as is; the functions that need the row raise.
    """
    model_type = getattr(vision_config(model), "model_type", None)
    if not model_type:
        raise UnknownImageEncoderError(
            f"{_name(model)}: its config has no `model_type`, so its family is unknown")
    return model_type.removesuffix("_vision_model")


def _family_row(model: nn.Module, need: str) -> Family:
    key = family(model)
    try:
        return FAMILIES[key]
    except KeyError:
        raise UnknownImageEncoderError(
            f"{_name(model)} (model_type {key!r}): mixres does not know its {need}; known "
            f"families: {', '.join(sorted(FAMILIES))} (add a row to mixres.vision_utils.FAMILIES)"
        ) from None


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


@_per_model
def image_encoder_size(model: nn.Module) -> int:
    """Channel width of what the vision encoder outputs (last_hidden_state's feature dim).

    For a whole CLIP/SigLIP model it is the vision tower's width.
    """
    config, tower = vision_config(model), vision_tower(model)
    for attr, rule in _WIDTH_RULES:
        if getattr(config, attr, None) is not None:
            return rule(config, tower)
    raise UnknownImageEncoderError(
        f"{_name(model)}: cannot tell its output width; its vision config "
        f"({type(config).__name__}) has none of {', '.join(a for a, _ in _WIDTH_RULES)}")


hidden_size = image_encoder_size


# patches and prefix tokens

@_per_model
def patch_size(model: nn.Module) -> int | None:
    """Side in pixels of the square patch that becomes one token; None for CNNs."""
    if family(model) in FAMILIES and not FAMILIES[family(model)].patch_tokens:
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


@_per_model
def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches in last_hidden_state (CLS, distillation, registers)."""
    return int(_family_row(model, "number of prefix tokens").prefix_tokens(vision_config(model)))


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
    the family's default (`FAMILIES`).
    """
    def family_default() -> MeanStd:
        if isinstance(model_or_path, nn.Module):
            return _family_row(model_or_path, "image normalization").mean_std
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
                f"default normalization; known families: {', '.join(sorted(FAMILIES))}")
        return FAMILIES[key].mean_std

    path = _saved_file(model_or_path, "preprocessor_config.json")
    return _read_mean_std(path, family_default) if path is not None else family_default()


# forward arguments

@functools.lru_cache(maxsize=512)
def _explicit_params(func) -> frozenset[str]:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return frozenset()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in named)


def accepts(func: Callable, name: str) -> bool:
    """Does `func` take a keyword argument called `name` as an explicit parameter?

    `**kwargs` does not count: HF forwards take `**kwargs` and silently drop what they do
    not know, so "accepted by **kwargs" would say yes to arguments that do nothing.
    Bound methods and modules are looked up on their class, so the answer is cached per class.
    """
    if isinstance(func, nn.Module):
        func = type(func).forward
    func = getattr(func, "__func__", func)
    try:
        return name in _explicit_params(func)
    except TypeError:  # unhashable callable: skip the cache
        return name in _explicit_params.__wrapped__(func)


def model_args_dict(model: nn.Module) -> dict:
    """Extra forward kwargs that let `model` run at any image size.

    {"interpolate_pos_encoding": True} where its forward takes it, else {}. DINOv2 always
    interpolates and DINOv3 (RoPE), SigLIP2 (NaFlex) and CNNs need nothing.
    """
    return {"interpolate_pos_encoding": True} if accepts(model, "interpolate_pos_encoding") else {}


def naflex_patches(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C): SigLIP2's patch layout, channels last in each patch.

    Matches `convert_image_to_patches` of HF's Siglip2 image processor; note the order differs
    from `mixres.packing.patchify` (C, p, p), because SigLIP2 embeds with a Linear, not a Conv.
    """
    b, c, H, W = pixel_values.shape
    if H % patch or W % patch:
        raise ValueError(f"SigLIP2 input {H}x{W} is not a multiple of its patch size {patch}")
    x = pixel_values.reshape(b, c, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (H // patch) * (W // patch), patch * patch * c)


def _siglip2_inputs(model: nn.Module, pixel_values: torch.Tensor) -> dict:
    # SigLIP2 (NaFlex) takes pre-cut patches plus each image's grid instead of an image; an
    # image alone has no padding, so its mask is all ones.
    p = patch_size(model)
    b, _, H, W = pixel_values.shape
    patches = naflex_patches(pixel_values, p)
    return {
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(patches.shape[:2], dtype=torch.long,
                                           device=pixel_values.device),
        "spatial_shapes": torch.tensor([[H // p, W // p]] * b, dtype=torch.long,
                                       device=pixel_values.device),
    }


# Families whose forward does not take a (B, C, H, W) image as `pixel_values`.
_INPUT_ADAPTERS: dict[str, Callable[[nn.Module, torch.Tensor], dict]] = {
    "siglip2": _siglip2_inputs,
}


def forward_kwargs(model: nn.Module, pixel_values: torch.Tensor, **extra) -> dict:
    """Keyword arguments to run `model(**kwargs)` on images (B, C, H, W) of any size.

    Adds `interpolate_pos_encoding=True` where the forward takes it. For SigLIP2 a 4-D
    `pixel_values` is cut into its NaFlex inputs (patches, pixel_attention_mask,
    spatial_shapes); a 3-D one is taken as already cut. `extra` is added last and wins.
    Pass `vision_tower(model)` for a whole CLIP/SigLIP model, whose forward wants text too.
    """
    adapter = _INPUT_ADAPTERS.get(family(model)) if hasattr(model, "config") else None
    if adapter is not None and pixel_values.ndim == 4:
        kwargs = adapter(model, pixel_values)
    else:
        kwargs = {"pixel_values": pixel_values}
    return {**kwargs, **model_args_dict(model), **extra}


# pooling

def _pool_cls(hidden, num_prefix, mask):
    if num_prefix == 0:
        raise ValueError("pool(how='cls') needs a prefix token, but num_prefix is 0 "
                         "(SigLIP and CNNs have no CLS token; use how='mean')")
    return hidden[:, 0]


def _pool_mean(hidden, num_prefix, mask):
    tokens = hidden[:, num_prefix:]
    if mask is None:
        return tokens.mean(1)
    mask = mask if mask.ndim == 2 else mask[None]
    if mask.shape[-1] == hidden.shape[1]:
        mask = mask[:, num_prefix:]
    elif mask.shape[-1] != tokens.shape[1]:
        raise ValueError(f"pool: mask has {mask.shape[-1]} positions; expected {hidden.shape[1]} "
                         f"(all tokens) or {tokens.shape[1]} (patch tokens only)")
    weight = mask.to(tokens.dtype)[..., None]
    # An image with no valid patch pools to zeros rather than NaN.
    return (tokens * weight).sum(1) / weight.sum(1).clamp_min(1)


_POOLERS: dict[str, Callable] = {"cls": _pool_cls, "mean": _pool_mean}


def pool(hidden: torch.Tensor, how: str, num_prefix: int = 0,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pool tokens (B, L, D) -> (B, D), or (L, D) -> (D,).

    how: "cls" (first token; needs num_prefix > 0), "mean" (mean over patch tokens only:
    the first `num_prefix` tokens and positions where `mask` is False are skipped) or
    "none" (hidden unchanged). mask: bool, True = valid, over all L tokens or over the
    L - num_prefix patch tokens, with or without the batch dim.
    """
    if how == "none":
        return hidden
    if how not in _POOLERS:
        raise ValueError(f"pool: unknown how={how!r}; expected one of "
                         f"{', '.join([*_POOLERS, 'none'])}")
    if hidden.ndim not in (2, 3):
        raise ValueError(f"pool: hidden should be (B, L, D) or (L, D), got {tuple(hidden.shape)}")
    unbatched = hidden.ndim == 2
    out = _POOLERS[how](hidden[None] if unbatched else hidden, num_prefix, mask)
    return out[0] if unbatched else out


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
