"""timm and open_clip models from a name: the model specs `load_model` takes besides HF ones.

    timm:<name>                    timm.create_model(name, pretrained=True, dynamic_img_size=True)
    timm:local-dir:<dir>, timm:<dir>   a folder saved by timm's save_for_hf (config.json + weights)
    hf-hub:timm/<repo>             as timm resolves it (same as timm:hf-hub:timm/<repo>)
    open_clip:<arch>               open_clip.create_model(arch), random init
    open_clip:<arch>:<tag|file>    ... with pretrained=<tag or checkpoint file>
    open_clip:hf-hub:<repo>, open_clip:local-dir:<dir>   open_clip's own schemas

`model_kwargs` go to the factory (timm: `pretrained=False`, `img_size`, `depth`,
`pretrained_cfg_overlay=dict(file=...)`, ...; open_clip: `force_image_size`, ...).

dynamic_img_size. timm ViT-family models are built with `dynamic_img_size=True` (unless the
kwargs say otherwise), so the model itself takes any image size and resamples its position
table per image exactly as mixres' packed route does; models whose constructor has no such
argument (CNNs, Swin, ...) are built without it. open_clip returns the image tower
(`model.visual`), whose `image_mean` / `image_std` open_clip set from the checkpoint's
preprocess cfg. Models come back in eval mode.
"""

from __future__ import annotations

import os

from torch import nn

from mixres.presets import UnknownModelError

__all__ = ["is_library_spec", "load_library_model"]

_PREFIXES = ("timm:", "hf-hub:timm/", "open_clip:")


def is_library_spec(name: str) -> bool:
    return name.startswith(_PREFIXES)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _timm_name(name: str) -> str:
    rest = name.removeprefix("timm:")
    if not rest.startswith(("hf-hub:", "local-dir:")) and os.path.isdir(rest):
        return f"local-dir:{rest}"
    return rest


def load_timm(name: str, **kwargs) -> nn.Module:
    import timm

    model_name = _timm_name(name)
    kwargs.setdefault("pretrained", True)
    try:
        try:
            model = timm.create_model(model_name, **{"dynamic_img_size": True, **kwargs})
        except TypeError as err:  # the architecture has no dynamic_img_size (CNNs, Swin, ...)
            if "dynamic_img_size" not in str(err) or "dynamic_img_size" in kwargs:
                raise
            model = timm.create_model(model_name, **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        hint = (" (no network? pass --model-kwargs '{\"pretrained\": false}' for random weights, or "
                "a timm:local-dir:<folder>)" if kwargs.get("pretrained") else "")
        raise UnknownModelError(f"{name!r}: timm could not build it: {_first_line(err)}{hint}") from None
    return model.eval()


def _open_clip_args(rest: str) -> tuple[str, str | None]:
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    arch, sep, pretrained = rest.partition(":")
    return arch, (pretrained or None) if sep else None


def load_open_clip(name: str, **kwargs) -> nn.Module:
    import open_clip

    arch, pretrained = _open_clip_args(name.removeprefix("open_clip:"))
    if pretrained is not None:
        kwargs.setdefault("pretrained", pretrained)
    try:
        model = open_clip.create_model(arch, **kwargs)
    except (RuntimeError, OSError, ValueError) as err:
        raise UnknownModelError(f"{name!r}: open_clip could not build it: {_first_line(err)}") from None
    return getattr(model, "visual", model).eval()


def load_library_model(name: str, **kwargs) -> nn.Module:
    """The timm or open_clip model that `name` names (see the module docstring)."""
    if name.startswith("open_clip:"):
        return load_open_clip(name, **kwargs)
    return load_timm(name, **kwargs)
