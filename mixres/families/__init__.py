"""Model families: one file per family, each registering one `FamilySpec` in `FAMILIES`.

    from mixres.families import FamilySpec, register_family
    SPEC = register_family(FamilySpec("vit", IMAGENET_STANDARD, prefix_tokens=cls_only,
                                      call=patch_call(), recipe=Recipe(...)))

An HF model is recognised by its vision config's model_type ("_vision_model" dropped, so a
whole CLIPModel and a CLIPVisionModel are both "clip"); a non-HF model by its class
(`FamilySpec.classes`). This module answers the questions every other part asks: which
family (`family`, `spec_of`), where its vision tower is (`vision_tower`, `vision_config`),
and how to call it on images (`forward_kwargs`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from mixres.families.spec import (
    IMAGENET_DEFAULT,
    IMAGENET_STANDARD,
    NO_NORMALIZATION,
    OPENAI_CLIP,
    Call,
    Embedded,
    FamilySpec,
    MeanStd,
    PosCache,
    Recipe,
    UnknownImageEncoderError,
    cls_only,
    no_prefix,
    per_model,
)
from mixres.registry import Registry

__all__ = ["FAMILIES", "FamilySpec", "Call", "Recipe", "Embedded", "PosCache", "MeanStd",
           "UnknownImageEncoderError", "register_family", "spec_of", "family_spec", "family",
           "vision_tower", "vision_config", "forward_kwargs", "call_pixels", "accepts", "model_args_dict",
           "num_prefix_tokens", "num_layers", "IMAGENET_DEFAULT", "IMAGENET_STANDARD", "OPENAI_CLIP",
           "NO_NORMALIZATION", "cls_only", "no_prefix"]

FAMILIES = Registry("model family")

# family key -> the file that registers it (imported on first use)
for _key, _module in {
    "vit": "vit", "deit": "deit", "clip": "clip", "siglip": "siglip", "siglip2": "siglip2",
    "dinov2": "dinov2", "dinov2_with_registers": "dinov2", "dinov3_vit": "dinov3",
    "dinov3_convnext": "cnn", "convnext": "cnn", "convnextv2": "cnn", "resnet": "cnn",
    "mobilevit": "cnn", "swin": "swin", "swinv2": "swin", "navit": "navit",
    # non-HF families, recognised by class (timm_any, any other timm model, is matched last)
    "timm_vit": "timm_vit", "timm_eva": "timm_eva", "timm_naflex": "timm_naflex",
    "open_clip": "open_clip", "open_clip_timm": "open_clip", "timm": "timm_any",
}.items():
    FAMILIES.lazy(_key, f"mixres.families.{_module}")


def register_family(spec: FamilySpec) -> FamilySpec:
    """Register `spec` under each of its keys (its HF model_types, or its name)."""
    for key in spec.keys:
        FAMILIES.register(key, spec)
    return spec


def _name(model) -> str:
    return type(model).__name__


def _class_spec(model: nn.Module) -> FamilySpec | None:
    """The spec of a non-HF model, recognised by its class (every family file is imported:
    they import no model library at top level)."""
    for spec in FAMILIES.load_all().values():
        if spec.classes and spec.matches_class(model):
            return spec
    return None


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
    -> its base model; a non-HF model -> what its spec's `tower` says.
    """
    if getattr(model, "config", None) is None:
        spec = _class_spec(model)
        if spec is not None and spec.tower is not None:
            return spec.tower(model)
    for _ in range(8):  # wrappers nest a few levels at most; never loop on a cycle
        child = _tower_child(model)
        if child is None:
            break
        model = child
    return model


def vision_config(model: nn.Module):
    """The HF config that describes the vision tower (`config.vision_config` when present)."""
    config = getattr(vision_tower(model), "config", None)
    if config is None:
        config = getattr(model, "config", None)
    if config is None:
        raise UnknownImageEncoderError(
            f"{_name(model)} has no `config`; mixres reads vision models through their HF config")
    inner = getattr(config, "vision_config", None)
    return config if inner is None else inner


@per_model
def family(model: nn.Module) -> str:
    """The family key: the vision config's model_type ("vit", "clip", "dinov3_vit", ...) for HF
    models, the spec's name for models recognised by class.

    A model_type mixres has no file for is returned as is; the functions that need its
    spec raise. A model with neither raises UnknownImageEncoderError.
    """
    if getattr(model, "config", None) is None:
        spec = _class_spec(model)
        if spec is not None:
            return spec.name
    model_type = getattr(vision_config(model), "model_type", None)
    if not model_type:
        raise UnknownImageEncoderError(
            f"{_name(model)}: its config has no `model_type`, so its family is unknown")
    return model_type.removesuffix("_vision_model")


def spec_of(model: nn.Module) -> FamilySpec | None:
    """The model's spec, or None for a family mixres has no file for."""
    try:
        key = family(model)
    except UnknownImageEncoderError:
        return None
    return FAMILIES.get(key) if key in FAMILIES else None


def family_spec(model: nn.Module, need: str = "family") -> FamilySpec:
    """The model's spec; a one-line error naming what was needed when there is none."""
    spec = spec_of(model)
    if spec is None:
        try:
            key = f"model_type {family(model)!r}"
        except UnknownImageEncoderError:
            key = "no model_type"
        raise UnknownImageEncoderError(
            f"{_name(model)} ({key}): mixres does not know its {need}; known families: "
            f"{', '.join(FAMILIES.names())} (add a file to mixres/families/)")
    return spec


@per_model
def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patches in last_hidden_state (CLS, distillation, registers)."""
    return int(family_spec(model, "number of prefix tokens").prefix_tokens(vision_tower(model)))


@per_model
def num_layers(model: nn.Module) -> int:
    """The layers `select_layer` counts: the model's hidden_states has num_layers + 1 entries
    (the embeddings, or a CNN's stem, then one per layer or stage)."""
    spec = spec_of(model)
    if spec is not None and spec.num_layers is not None:
        return int(spec.num_layers(vision_tower(model)))
    config = vision_config(model)
    if getattr(config, "num_hidden_layers", None) is not None:
        return int(config.num_hidden_layers)
    if getattr(config, "depths", None) is not None:  # staged models: ResNet, ConvNeXt, Swin
        return len(config.depths)
    raise UnknownImageEncoderError(f"{_name(model)}: its config has neither num_hidden_layers nor "
                                   f"depths, so mixres cannot count its layers")


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


def forward_kwargs(model: nn.Module, pixel_values: torch.Tensor, **extra) -> dict:
    """Keyword arguments to run `model(**kwargs)` on images (B, C, H, W) of any size.

    Adds `interpolate_pos_encoding=True` where the forward takes it. Where the family has
    an input adapter (SigLIP2: NaFlex patches, pixel_attention_mask, spatial_shapes) a 4-D
    `pixel_values` goes through it; a 3-D one is taken as already cut. `extra` wins.
    Pass `vision_tower(model)` for a whole CLIP/SigLIP model, whose forward wants text too.
    """
    spec = spec_of(model) if hasattr(model, "config") else None
    if spec is not None and spec.inputs is not None and pixel_values.ndim == 4:
        kwargs = spec.inputs(model, pixel_values)
    else:
        kwargs = {"pixel_values": pixel_values}
    return {**kwargs, **model_args_dict(model), **extra}


def call_pixels(model: nn.Module, pixels: torch.Tensor, **kw):
    """The model's own forward on images (B, C, H, W): a `Call`'s default `call`."""
    return model(**forward_kwargs(model, pixels, **kw))
