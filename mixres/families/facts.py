"""What a loaded model is, as numbers: `ModelFacts`, computed once per model from its family spec.

    facts = model_facts(model)
    facts.patch_size, facts.hidden_size, facts.num_prefix, facts.num_layers, facts.mean_std,
    facts.channels, facts.tower, facts.family, facts.spec

Every part that needs one of these asks here: the encoders, the `Preprocessor`, the VLM
towers and `vision_utils` (the seed toolkit's names, which answer from this object). Each
fact is computed on first use and kept (a model's config and module tree are not expected
to change once it is built); a fact mixres cannot tell raises `UnknownImageEncoderError`
naming the model and the fact, and is asked again next time (errors are not kept).
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from collections.abc import Callable
from pathlib import Path

from torch import nn

from mixres.families import (
    FAMILIES,
    family,
    family_spec,
    num_layers,
    num_prefix_tokens,
    spec_of,
    vision_config,
    vision_tower,
)
from mixres.families.spec import NO_NORMALIZATION, FamilySpec, MeanStd, UnknownImageEncoderError

__all__ = ["ModelFacts", "model_facts", "mean_std_of"]


def _name(model) -> str:
    return type(model).__name__


# model -> {fact: value}: plain values only, never the model, so the entry goes with the model
_VALUES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kept(fn):
    """A fact computed on first use and kept per model (errors are not kept)."""
    name = fn.__name__

    @property
    @functools.wraps(fn)
    def fact(self):
        try:
            values = _VALUES.setdefault(self.model, {})
        except TypeError:  # not weak-referenceable: compute every time
            return fn(self)
        if name not in values:
            values[name] = fn(self)
        return values[name]

    return fact


class ModelFacts:
    """The facts of one model (see the module docstring); `model_facts(model)` gives it."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def tower(self) -> nn.Module:
        return vision_tower(self.model)

    @property
    def spec(self) -> FamilySpec | None:
        return spec_of(self.model)

    @property
    def family(self) -> str:
        return family(self.model)

    @_kept
    def patch_size(self) -> int | None:
        """Side in pixels of the square patch that becomes one token; None for CNNs."""
        spec = self.spec
        if spec is not None and spec.patch_size is not None:
            return spec.patch_size(self.tower)
        if spec is not None and not spec.patch_tokens:
            return None
        value = getattr(vision_config(self.model), "patch_size", None)
        if value is None:
            raise UnknownImageEncoderError(
                f"{_name(self.model)} (model_type {self.family!r}): its vision config has no `patch_size`")
        if isinstance(value, int):
            return value
        sides = {int(v) for v in value}
        if len(sides) != 1:
            raise ValueError(f"{_name(self.model)}: patch_size {tuple(value)} is not square; mixres "
                             "cuts images into square patches")
        return sides.pop()

    @_kept
    def hidden_size(self) -> int:
        """Channel width of what the vision encoder outputs (last_hidden_state's feature dim)."""
        spec = self.spec
        if spec is not None and spec.hidden_size is not None:
            return spec.hidden_size(self.tower)
        config = vision_config(self.model)
        for attr, rule in _WIDTH_RULES:
            if getattr(config, attr, None) is not None:
                return rule(config, self.tower)
        raise UnknownImageEncoderError(
            f"{_name(self.model)}: cannot tell its output width; its vision config "
            f"({type(config).__name__}) has none of {', '.join(a for a, _ in _WIDTH_RULES)}")

    @_kept
    def num_prefix(self) -> int:
        """Tokens before the patches (CLS, distillation, registers)."""
        return num_prefix_tokens(self.model)

    @_kept
    def num_layers(self) -> int:
        """The layers `select_layer` counts (hidden_states has num_layers + 1 entries)."""
        return num_layers(self.model)

    @_kept
    def mean_std(self) -> MeanStd:
        """(mean, std) per channel: the model's saved preprocessor_config.json, else its family's."""
        return mean_std_of(self.model)

    @property
    def channels(self) -> int:
        return len(self.mean_std[0])

    def __repr__(self) -> str:
        return f"ModelFacts({_name(self.model)})"


def model_facts(model: nn.Module) -> ModelFacts:
    """The facts of `model`: each computed once per model and kept with it (weakly)."""
    return ModelFacts(model)


# width: how configs state the channel width of last_hidden_state, tried in order

def _embed_dim_width(config, tower) -> int:
    depths = getattr(config, "depths", None)
    return int(config.embed_dim) * 2 ** (len(depths) - 1 if depths else 0)


def _mobilevit_width(config, tower) -> int:
    # MobileViTModel(expand_output=False) (the segmentation backbone) skips the final 1x1
    # expansion conv, so it outputs the last stage's channels instead: a constructor
    # argument, not a config field, hence a fact of the instance.
    return int(config.neck_hidden_sizes[-1 if getattr(tower, "expand_output", True) else -2])


# MobileViT's neck rule comes before `hidden_sizes`, which MobileViT also has (its transformer widths)
_WIDTH_RULES: tuple[tuple[str, Callable], ...] = (
    ("hidden_size", lambda config, tower: int(config.hidden_size)),  # ViTs; Swin's final width
    ("neck_hidden_sizes", _mobilevit_width),
    ("hidden_sizes", lambda config, tower: int(config.hidden_sizes[-1])),  # ResNet, ConvNeXt
    ("embed_dim", _embed_dim_width),  # Swin-like configs without hidden_size
)


# normalization: the saved preprocessor_config.json, else the family's default

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
    import transformers

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


def mean_std_of(model_or_path) -> MeanStd:
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
