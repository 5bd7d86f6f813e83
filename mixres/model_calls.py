"""How to call each HF vision family on a batch of images of one shape.

The shape-grouped route (`mixres.batch_image_encoder`) runs any HF vision model, ViT
or CNN, on batches of images that share a shape: exact by construction, since the
model sees exactly what it would see for each image alone. What differs per family is
small and lives in the `CALLS` table, keyed by `config.model_type`:

    crop        crop each image to a multiple of this many pixels first (the patch size
                of patch-embedding models, whose stride-p conv drops the remainder
                anyway, so more images share a shape), or None to keep the exact size
                (Swin pads internally, CNNs use every pixel)
    call        how to feed a (B, C, H, W) batch (SigLIP2 NaFlex wants patches, an
                attention mask and spatial shapes instead of pixels)
    key         which images may share a batch (exact shape; SigLIP2: equal patch count,
                since it resizes position embeddings per image)
    grid        the output token grid of an (H, W) image, for sequence outputs
    stride      input pixels per output token along each side (budgets, preprocessing)

Families not in the table get `GENERIC`: exact-shape groups, the model's own output.
Keys are `mixres.vision_utils.family` keys (model_type without "_vision_model"); the
facts vision_utils knows (towers, NaFlex inputs, interpolation flags) are asked there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mixres import vision_utils
from mixres.vision_utils import vision_tower

__all__ = ["FamilyCall", "CALLS", "GENERIC", "call_for", "family", "output_tokens", "vision_tower"]


# helpers

def _cfg_patch(config) -> int:
    p = config.patch_size
    return int(p[0] if isinstance(p, (list, tuple)) else p)


def family(model: nn.Module) -> str:
    """vision_utils' family key ("vit", "clip", "swinv2", ...), "" when there is none."""
    try:
        return vision_utils.family(model)
    except vision_utils.UnknownImageEncoderError:
        return ""


# how to call

def _call_pixels(model: nn.Module, pixels: torch.Tensor, **kw):
    # interpolate_pos_encoding=True where the forward takes it; SigLIP2's NaFlex inputs
    return model(**vision_utils.forward_kwargs(model, pixels, **kw))


def _call_naflex_list(model: nn.Module, images: list[torch.Tensor], **kw):
    """SigLIP2 on images of equal patch count but different shapes, in one batch.

    Its position embeddings are resized per image from `spatial_shapes`, so images of one
    token count need no padding to share a batch.
    """
    parts = [vision_utils.forward_kwargs(model, img[None]) for img in images]
    patches, mask, shapes = (torch.cat([part[k] for part in parts])
                             for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes"))
    return model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes, **kw)


def _call_navit(model: nn.Module, pixels: torch.Tensor, **kw):
    """mixres' NaViT AutoModel: it takes a list of images and packs them along one
    sequence (1, B*n, D); images of one shape give back a (B, n, D) batch."""
    if kw.get("output_hidden_states"):
        raise ValueError("NaViTModel returns no hidden_states; use select_layer=-1 with the "
                         "grouped route, or the 'navit' backend for other layers")
    out = model(images=list(pixels.unbind(0)))
    tokens = out.last_hidden_state
    return BaseModelOutputWithPooling(last_hidden_state=tokens.reshape(pixels.shape[0], -1, tokens.shape[-1]),
                                      pooler_output=out.pooler_output)


# grids of sequence outputs

def _grid_patch(config, H: int, W: int) -> tuple[int, int]:
    p = _cfg_patch(config)
    return H // p, W // p


def _grid_swin(config, H: int, W: int) -> tuple[int, int]:
    # patch embedding pads to a multiple of the patch, each patch merging pads to even
    p = _cfg_patch(config)
    h, w = math.ceil(H / p), math.ceil(W / p)
    for _ in range(len(config.depths) - 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def _grid_dinov3_convnext(config, H: int, W: int) -> tuple[int, int]:
    # stem: conv k4 s4; every later stage starts with a conv k2 s2 (no padding: floor)
    h, w = H // 4, W // 4
    for _ in range(len(config.hidden_sizes) - 1):
        h, w = h // 2, w // 2
    return h, w


def _stride_swin(config) -> int:
    return _cfg_patch(config) * 2 ** (len(config.depths) - 1)


def _stride_resnet(config) -> int:
    # embedder conv s2 + max-pool s2; every stage after the first halves the map
    first = 2 if getattr(config, "downsample_in_first_stage", False) else 1
    return 4 * first * 2 ** (len(config.hidden_sizes) - 1)


# the table

@dataclass(frozen=True)
class FamilyCall:
    """How one family is cropped, grouped, called and read back (see the module docstring)."""

    crop: Callable[[object], int | None] = lambda cfg: None
    call: Callable = _call_pixels
    whole_patches: bool = False         # the forward itself refuses a partial patch
    call_list: Callable | None = None   # a batch of images whose shapes differ but `key` agrees
    key: Callable[[object, tuple[int, ...]], tuple] = lambda cfg, chw: tuple(chw)
    grid: Callable[[object, int, int], tuple[int, int]] | None = None
    stride: Callable[[object], int | None] = lambda cfg: None
    min_size: Callable[[object], int] = lambda cfg: 1


def _patch_family() -> FamilyCall:
    return FamilyCall(crop=_cfg_patch, grid=_grid_patch, stride=_cfg_patch, min_size=_cfg_patch)


GENERIC = FamilyCall()

CALLS: dict[str, FamilyCall] = {
    "vit": _patch_family(),
    "deit": _patch_family(),
    "clip": _patch_family(),
    "siglip": _patch_family(),
    "dinov2": _patch_family(),
    "dinov2_with_registers": _patch_family(),
    "dinov3_vit": _patch_family(),
    "siglip2": FamilyCall(
        crop=_cfg_patch, call_list=_call_naflex_list, whole_patches=True,
        key=lambda cfg, chw: (chw[0], (chw[1] // _cfg_patch(cfg)) * (chw[2] // _cfg_patch(cfg))),
        grid=_grid_patch, stride=_cfg_patch, min_size=_cfg_patch),
    "navit": FamilyCall(crop=_cfg_patch, call=_call_navit, whole_patches=True, grid=_grid_patch,
                        stride=_cfg_patch, min_size=_cfg_patch),
    "swin": FamilyCall(grid=_grid_swin, stride=_stride_swin),
    "swinv2": FamilyCall(grid=_grid_swin, stride=_stride_swin),
    "resnet": FamilyCall(stride=_stride_resnet),
    "mobilevit": FamilyCall(stride=lambda cfg: int(getattr(cfg, "output_stride", 32))),
    "convnext": FamilyCall(stride=lambda cfg: 4 * 2 ** (len(cfg.hidden_sizes) - 1)),
    "convnextv2": FamilyCall(stride=lambda cfg: 4 * 2 ** (len(cfg.hidden_sizes) - 1)),
    "dinov3_convnext": FamilyCall(grid=_grid_dinov3_convnext,
                                  stride=lambda cfg: 4 * 2 ** (len(cfg.hidden_sizes) - 1)),
}


def call_for(model: nn.Module) -> FamilyCall:
    return CALLS.get(family(model), GENERIC)


def output_tokens(hidden: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """A batch's hidden state as (B, n, D) tokens, plus the grid when it is a feature map.

    CNN feature maps (B, C, h, w) are flattened row-major to (B, h*w, C).
    """
    if hidden.ndim == 4:
        return hidden.flatten(2).transpose(1, 2), (hidden.shape[2], hidden.shape[3])
    if hidden.ndim == 3:
        return hidden, None
    raise ValueError(f"expected a (B, n, D) sequence or a (B, C, h, w) feature map from the "
                     f"model, got shape {tuple(hidden.shape)}")
