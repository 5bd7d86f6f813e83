"""One way in for an image: `Preprocessor`, from what a user has in hand to the encoder's input.

    source --decoder--> upright RGB --target_size--> (H, W) on the patch grid --> normalized (C, H, W)

A `Preprocessor` is built from a model's facts (patch size, mean/std: `encoder.facts`, or
anything with `patch_size` and `mean_std`) and a decoder choice (`decode="pil" | "fast" |
"cuda"`, `mixres.decode`). Every encoder, `mixres.encode`, the VLM collator and the embed
driver prepare images through it, so `decode=` means the same thing everywhere.

What it takes (what HF image processors take), per image:
    path / bytes / binary file-like / PIL image   decoded by the decoder (EXIF, modes, bombs)
    numpy array or tensor of pixels               (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4:
        integers in [0, 255] (uint16: [0, 65535]), floats in [0, 1]; converted as PIL converts
        the same pixels (L and RGB as they are, RGBA composited onto the background), so they
        encode exactly as `PIL.Image.fromarray` of them does. A 3-D array is HWC when its last
        side is 1, 3 or 4 (numpy: what PIL, OpenCV and most loaders give), else CHW; a tensor
        is CHW when its first side is (torch's convention), else HWC. OpenCV's BGR is not
        guessed: convert it to RGB first.
    a float (C, H, W) tensor with the model's C   already resized and normalized (mixres'
        long-standing contract): checked against the patch grid and used as it is.
A list gives a list (an empty list gives an empty list); a 4-D array or tensor is a batch.
Anything else, or a bad image, raises `ImageLoadError` (a ValueError) in one line naming the
input's index and what was expected; nothing is decoded past it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mixres.images import (
    _WHITE,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    _check_background,
    _check_ready,
    _token_bounds,
    load_image,
)
from mixres.packing import PackedImages

__all__ = ["Preprocessor", "DEFAULT_MAX_IMAGE_TOKENS"]

DEFAULT_MAX_IMAGE_TOKENS = 1024
_SOURCES = (str, os.PathLike, bytes, bytearray, memoryview, io.IOBase, Image.Image)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class Preprocessor:
    """Images in, normalized (C, H, W) float32 tensors on the patch grid out (see the module doc).

    facts             the model's facts (`ModelFacts`, an Encoder, ...): `patch_size`, `mean_std`
    decode            "pil" (the reference), "fast" (libjpeg-turbo + torch resize) or "cuda"
    min_image_tokens, max_image_tokens   the resize policy, in patches (`mixres.images.target_size`)
    unit              resize every side to a multiple of this many pixels (default: the patch
                      size; the VLM's merging adapters ask for 2 patches)
    mean_std          overrides the facts' normalization
    max_grid          (rows, cols) the grid may not exceed (NaViT's position tables): an image
                      is shrunk, aspect kept, until its grid fits
    check_ready       check ready tensors against the grid (False: the caller does, as the
                      encoders do where they pack or crop them)
    ready_bounds      also hold ready tensors to the token bounds (the VLM collator does)

    It holds plain values only, so it pickles cheaply into DataLoader workers.
    """

    def __init__(self, facts=None, *, decode: str = "pil", min_image_tokens: int = 1,
                 max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS, unit: int | None = None,
                 patch_size: int | None = None, mean_std=None, max_grid: tuple[int, int] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, background: Sequence[int] = _WHITE,
                 check_ready: bool = True, ready_bounds: bool = False):
        from mixres.decode import get_decoder

        self.patch_size = patch_size if patch_size is not None else getattr(facts, "patch_size", None)
        self.unit = unit if unit is not None else self.patch_size
        if not isinstance(self.unit, int) or self.unit < 1:
            raise ValueError(f"Preprocessor: no resize unit for this model (patch size {self.unit!r}); "
                             "pass normalized (C, H, W) tensors, or unit=")
        mean, std = mean_std if mean_std is not None else facts.mean_std
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.min_image_tokens, self.max_image_tokens = _token_bounds(min_image_tokens, max_image_tokens)
        self.max_grid = None if max_grid is None else (int(max_grid[0]), int(max_grid[1]))
        self.max_pixels, self.background = max_pixels, _check_background(background)
        self.check_ready, self.ready_bounds = check_ready, ready_bounds
        self.decode = decode
        get_decoder(decode)  # an unknown name, or cuda without a GPU: one line, now

    @property
    def channels(self) -> int:
        return len(self.mean)

    def __repr__(self) -> str:
        return (f"Preprocessor(decode={self.decode!r}, unit={self.unit}, min_image_tokens="
                f"{self.min_image_tokens}, max_image_tokens={self.max_image_tokens})")

    # the public calls

    def __call__(self, images):
        """One input -> one (C, H, W) tensor; a list (or a 4-D batch) -> a list of them."""
        if _is_batch(images):
            return self.many(images)
        return self.many([images], single=True)[0]

    def many(self, images, *, single: bool = False) -> list[torch.Tensor]:
        """Each input prepared, in order; the first bad one raises naming its index."""
        items = list(images)
        out: list = [None] * len(items)
        sources = {}
        for i, item in enumerate(items):
            try:
                kind = self._kind(item)
                if kind == "ready":
                    out[i] = self._ready(item)
                elif kind == "pixels":
                    sources[i] = _pixels_to_pil(item)
                else:
                    sources[i] = item
            except (ValueError, TypeError) as e:
                raise _named(e, None if single else i) from None
        if sources:
            for i, x in zip(sources, self._decode(list(sources.values()))):
                if isinstance(x, Exception):
                    raise _named(x, None if single else i) from None
                out[i] = x
        return out

    def pack(self, images) -> PackedImages:
        """The inputs as PackedImages (patches of `patch_size`); PackedImages pass through."""
        if isinstance(images, PackedImages):
            return images
        return PackedImages.from_images(self.many(images if _is_batch(images) else [images]), self.patch_size)

    # kinds

    def _kind(self, item) -> str:
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and item.ndim == 3 and item.shape[0] == self.channels:
                return "ready"
            return "pixels"
        if isinstance(item, np.ndarray):
            return "pixels"
        if isinstance(item, _SOURCES) or hasattr(item, "read"):
            return "source"
        raise TypeError(f"expected a path, bytes, a PIL image, a numpy array or a tensor, got "
                        f"{type(item).__name__}")

    def _ready(self, t: torch.Tensor) -> torch.Tensor:
        if not self.check_ready:
            return t
        lo, hi = (self.min_image_tokens, self.max_image_tokens) if self.ready_bounds else (1, None)
        try:
            _check_ready(t, self.unit, self.channels, lo, hi)
        except ValueError as e:
            raise ValueError(f"{str(e).removeprefix('preprocess: ')} (a float (C, H, W) tensor with "
                             f"{self.channels} channels is taken as already resized and normalized; "
                             "give uint8 pixels, a numpy array or a PIL image to have it resized)") from None
        return t

    # decoding

    def _decode(self, sources: list) -> list:
        from mixres.decode import get_decoder

        decoder = get_decoder(self.decode)
        if self.max_grid is None:
            return decoder.preprocess_many(sources, self.unit, **self._policy(self.min_image_tokens,
                                                                             self.max_image_tokens))
        out = []
        for src in sources:  # the cap depends on each image's aspect: decoded whole first
            try:
                img = load_image(src, background=self.background, max_pixels=self.max_pixels)
                lo, hi = self._fit(img.height, img.width)
                out.append(decoder.preprocess(img, self.unit, **self._policy(lo, hi)))
            except ImageLoadError as e:
                out.append(e)
        return out

    def _policy(self, lo: int, hi: int | None) -> dict:
        return {"mean": self.mean, "std": self.std, "min_image_tokens": lo, "max_image_tokens": hi,
                "background": self.background, "max_pixels": self.max_pixels}

    def _fit(self, height: int, width: int) -> tuple[int, int | None]:
        """Token bounds under which an image of this aspect keeps its grid within max_grid."""
        max_h, max_w = self.max_grid
        ratio = width / height
        # the most tokens a grid of this aspect can have: h = sqrt(t/r) <= max_h, w = sqrt(t*r) <= max_w;
        # past the point where one side clamps to a single patch, (1, t) or (t, 1) fits while t <= max
        cap = max(1, int(min(max_h ** 2 * ratio, max_w ** 2 / ratio)),
                  min(max_w, int(ratio)), min(max_h, int(1 / ratio)))
        hi = cap if self.max_image_tokens is None else min(self.max_image_tokens, cap)
        return min(self.min_image_tokens, hi), hi


# helpers

def _is_batch(images) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4


def _named(e: Exception, index: int | None) -> ImageLoadError:
    """`e` as one line naming the input's index (and its file, where it has one)."""
    if index is None:
        return e if isinstance(e, ValueError) else ImageLoadError("input", str(e))
    if isinstance(e, ImageLoadError):
        return ImageLoadError(f"input {index} ({e.name})", e.reason)
    return ImageLoadError(f"input {index}", str(e))


def _pixels_to_pil(x) -> Image.Image:
    """An array or tensor of pixels -> the PIL image PIL would make of the same 8-bit pixels."""
    what = f"{type(x).__module__.split('.')[0]} array of shape {tuple(x.shape)} ({x.dtype})"
    if isinstance(x, torch.Tensor):
        channels_first = True
        x = x.detach().cpu().numpy()
    else:
        channels_first = False
    if x.ndim == 3:
        first, last = x.shape[0] in _MODES, x.shape[-1] in _MODES
        if (channels_first and first) or not last and first:
            x = np.moveaxis(x, 0, -1)
        elif not last:
            raise ValueError(f"{what}: expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3 or 4")
    elif x.ndim != 2:
        raise ValueError(f"{what}: expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3 or 4")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what}: empty image")
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    return Image.fromarray(_to_u8(x, what), _MODES[x.shape[-1]] if x.ndim == 3 else "L")


def _to_u8(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{what}: expected integer or float pixels")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise ValueError(f"{what}: holds NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"{what}: float pixels must be in [0, 1], got [{x.min():g}, {x.max():g}]")
        return np.rint(x.astype(np.float64) * 255).astype(np.uint8)
    top = 65535 if x.dtype == np.uint16 else 255
    if x.min() < 0 or x.max() > top:
        raise ValueError(f"{what}: integer pixels must be in [0, {top}], got [{x.min()}, {x.max()}]")
    if top == 65535:  # as PIL maps 16-bit images (mixres.images: x / 257)
        return np.rint(x.astype(np.float64) / 257.0).astype(np.uint8)
    return x.astype(np.uint8)
