"""Images in, CHW float tensors out: loading, the resize policy, normalization.

This is the first step of the path of one image (see ARCHITECTURE.md):

    file / bytes / PIL / tensor --load_image--> RGB PIL image (EXIF applied, alpha composited)
                                --target_size-> (H, W): multiples of the patch size, aspect
                                                kept, token count within [min, max]
                                --preprocess--> (3, H, W) float tensor, normalized

No image is ever padded or cropped: each keeps its own size (rounded to the patch grid)
unless the token budget forces it to shrink or grow, and then its aspect ratio is kept
as closely as the grid allows.

Loading is strict. Anything that cannot become a sane RGB image — a missing path, an
empty, truncated or corrupt file, something that is not an image, a decompression bomb —
raises `ImageLoadError` (a `ValueError`) naming the file and the reason, at load time,
never later inside a batch.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mixres.formats import decode_unidentified

__all__ = ["DEFAULT_MAX_PIXELS", "ImageLoadError", "ImageSource", "load_image", "normalize", "preprocess",
           "target_size", "to_tensor"]

# PIL's own default `Image.MAX_IMAGE_PIXELS` (1024 * 1024 * 1024 // 4 // 3, about 0.25 GiB
# of RGB), spelled out so that a caller changing PIL's global does not change ours.
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image

_WHITE = (255, 255, 255)


class ImageLoadError(ValueError):
    """An image could not be loaded. The message names the file and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


# helpers

def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _token_bounds(min_image_tokens, max_image_tokens) -> tuple[int, int | None]:
    min_image_tokens = _positive_int(min_image_tokens, "min_image_tokens")
    if max_image_tokens is not None:
        max_image_tokens = _positive_int(max_image_tokens, "max_image_tokens")
        if min_image_tokens > max_image_tokens:
            raise ValueError(f"min_image_tokens ({min_image_tokens}) must not exceed "
                             f"max_image_tokens ({max_image_tokens})")
    return min_image_tokens, max_image_tokens


def _check_background(background) -> tuple[int, int, int]:
    bg = tuple(background)
    if len(bg) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in bg):
        raise ValueError(f"background must be an RGB triple of ints in [0, 255], "
                         f"got {background!r}")
    return tuple(int(c) for c in bg)


_bomb_lock = threading.Lock()
_bomb_depth = 0
_bomb_saved: int | None = None


@contextmanager
def _pil_bomb_check_off() -> Iterator[None]:
    """Switch PIL's global decompression-bomb check off while we enforce our own.

    PIL checks `Image.MAX_IMAGE_PIXELS` (a process-wide global) inside `Image.open`, which
    would override the caller's `max_pixels` in both directions. The global is restored
    when the last concurrent load leaves, so threads loading at the same time cannot
    restore each other's value in the wrong order.
    """
    global _bomb_depth, _bomb_saved
    with _bomb_lock:
        if _bomb_depth == 0:
            _bomb_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _bomb_depth += 1
    try:
        yield
    finally:
        with _bomb_lock:
            _bomb_depth -= 1
            if _bomb_depth == 0:
                Image.MAX_IMAGE_PIXELS = _bomb_saved


# mode conversion

def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    # Dropping alpha would expose whatever colour the encoder left under transparent
    # pixels (often black, sometimes garbage); blend onto a known background instead.
    out = Image.new("RGB", rgba.size, background)
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _int_to_l(img: Image.Image) -> Image.Image:
    # 16-bit sources (PNG, TIFF) open as I;16* or, in older PIL and some TIFFs, as 32-bit
    # I holding 16-bit values. Mapping every integer mode by the 16-bit range (x / 257,
    # 65535 -> 255) treats both alike; 32-bit values outside [0, 65535] are clipped rather
    # than rescaled by their own min/max, which would make the result depend on content.
    arr = np.asarray(img).astype(np.float64)
    arr = np.clip(arr, 0, 65535) / 257.0
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def _float_to_l(img: Image.Image) -> Image.Image:
    # Float images have no declared range. Values within [0, 1] are taken as normalized
    # intensities (x 255); anything larger is taken as already on the 8-bit scale and
    # clipped to [0, 255]. NaN and infinities become 0 / the clip bounds.
    arr = np.asarray(img).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size and finite.max() <= 1.0:
        arr = arr * 255.0
    arr = np.clip(np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0), 0, 255)
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image, background: tuple[int, int, int], name: str) -> Image.Image:
    """Any PIL mode -> RGB: integers by the 16-bit range, floats by [0, 1] or [0, 255],
    anything with alpha (or a transparent palette index / tRNS colour) composited onto
    `background`, the rest by PIL's own conversion."""
    mode = img.mode
    if mode.startswith("I"):
        return _int_to_l(img).convert("RGB")
    if mode == "F":
        return _float_to_l(img).convert("RGB")
    if mode == "La":
        # premultiplied; PIL only un-premultiplies it into LA
        img, mode = img.convert("LA"), "LA"
    # P with a transparent palette index, L/RGB with a tRNS colour: all carry alpha too.
    if mode in ("RGBA", "RGBa", "LA", "PA") or img.has_transparency_data:
        return _composite(img.convert("RGBA"), background)
    # What is left (RGB, RGBX, L, 1, P, CMYK, YCbCr, HSV, LAB) PIL converts correctly on its
    # own; CMYK JPEGs, Adobe-inverted ones included, are un-inverted by the decoder.
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageLoadError(name, f"unsupported image mode {mode!r} ({e})") from e


# loading

def _open(src: ImageSource) -> tuple[Image.Image | io.BytesIO, str]:
    """Resolve `src` to something `Image.open` takes, plus the name used in errors."""
    if isinstance(src, Image.Image):
        return src, getattr(src, "filename", "") or "<PIL image>"
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "<bytes>"
    elif isinstance(src, (str, os.PathLike)):
        path, name = Path(src), os.fspath(src)
        try:
            exists = path.exists()
        except (OSError, ValueError) as e:  # e.g. a NUL byte or a name too long
            raise ImageLoadError(name, f"unreadable path ({e})") from e
        if not exists:
            raise ImageLoadError(name, "no such file")
        if path.is_dir():
            raise ImageLoadError(name, "is a directory, not an image file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageLoadError(name, f"unreadable path ({e.strerror or e})") from e
    elif hasattr(src, "read"):
        # Read file-likes whole: PIL needs to seek, and sockets or pipes cannot.
        name = getattr(src, "name", None)
        name = name if isinstance(name, str) else "<file-like>"
        try:
            data = src.read()
        except OSError as e:
            raise ImageLoadError(name, f"unreadable stream ({e})") from e
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{name}: file-like must be opened in binary mode, "
                            f"read() returned {type(data).__name__}")
    else:
        raise TypeError("image source must be a path, bytes, a binary file-like or a PIL "
                        f"image, got {type(src).__name__}")
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return io.BytesIO(data), name


def load_image(
    src: ImageSource,
    *,
    background: Sequence[int] = _WHITE,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load `src` as a fully decoded RGB PIL image.

    src         a path, bytes, a binary file-like or a PIL image (never modified; a new
                image is returned)
    background  RGB colour that transparent pixels are composited onto
    max_pixels  refuse images with more pixels than this, read from the header before any
                pixel is decoded (decompression bombs); None disables the check

    EXIF orientation is applied, multi-frame files (GIF, TIFF) give their first frame, and
    every PIL mode becomes RGB (see `_to_rgb` for how 16-bit, 32-bit and float images are
    brought to 8 bits). Raises `ImageLoadError` naming the file and the reason.
    """
    background = _check_background(background)
    if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels < 0):
        raise ValueError(f"max_pixels must be a non-negative int or None, got {max_pixels!r}")
    opened, name = _open(src)
    with _pil_bomb_check_off():
        try:
            img = opened if isinstance(opened, Image.Image) else Image.open(opened)
        except UnidentifiedImageError:
            try:  # PIL reads AVIF; HEIC goes to TorchCodec
                img = decode_unidentified(opened.getvalue())
            except ValueError as e:
                raise ImageLoadError(name, str(e)) from None
        except Image.DecompressionBombError as e:
            raise ImageLoadError(name, f"too large ({e})") from e
        except Exception as e:
            raise ImageLoadError(name, f"corrupt image header ({type(e).__name__}: {e})") from e
        try:
            return _decode(img, name, background, max_pixels)
        finally:
            if img is not opened:
                img.close()


def check_header_size(name: str, w: int, h: int, max_pixels: int | None) -> None:
    """The bomb guard and the empty-image check, from the header's size (before decoding)."""
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(name, f"too large: {w}x{h} = {w * h} pixels exceeds "
                                   f"max_pixels={max_pixels} (decompression bomb guard)")
    if w * h == 0:
        raise ImageLoadError(name, f"empty image ({w}x{h} pixels)")


def _decode(img: Image.Image, name: str, background: tuple[int, int, int],
            max_pixels: int | None) -> Image.Image:
    check_header_size(name, *img.size, max_pixels)
    try:
        # Decode now, so that a truncated file fails here and not inside a batch.
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(name, f"too large ({e})") from e
    except Exception as e:
        what = "truncated" if "truncat" in str(e).lower() else "corrupt"
        raise ImageLoadError(name, f"{what} image data ({type(e).__name__}: {e})") from e
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:
        # A broken EXIF block says nothing reliable about orientation; browsers show such
        # files unrotated, and so do we.
        upright = img
    return _to_rgb(upright, background, name)


# resize policy

def _round_div(n: int, d: int) -> int:
    """n / d rounded half up, in integers."""
    return (2 * n + d) // (2 * d)


def target_size(
    height: int,
    width: int,
    patch_size: int,
    *,
    min_image_tokens: int = 1,
    max_image_tokens: int | None = None,
) -> tuple[int, int]:
    """The (H, W) an image of `height` x `width` is resized to before patching.

    H and W are positive multiples of `patch_size`, and the grid (H/p) x (W/p) holds
    between `min_image_tokens` and `max_image_tokens` patches. An image whose native size, rounded
    to the grid, is within those bounds keeps it. Otherwise it is scaled (up or down)
    to the bound it crossed: the grid is the integer one nearest the ideal grid of that
    many tokens and the image's aspect ratio (see `_best_grid`). When the aspect ratio
    is more extreme than the budget allows (10000 x 20 with 64 tokens: the short side
    would be under one patch), the short side is clamped to one patch and the long side
    takes the whole budget.
    """
    height = _positive_int(height, "height")
    width = _positive_int(width, "width")
    p = _positive_int(patch_size, "patch_size")
    min_image_tokens, max_image_tokens = _token_bounds(min_image_tokens, max_image_tokens)

    gh, gw = max(1, _round_div(height, p)), max(1, _round_div(width, p))
    if gh * gw < min_image_tokens:
        budget = min_image_tokens
    elif max_image_tokens is not None and gh * gw > max_image_tokens:
        budget = max_image_tokens
    else:
        return gh * p, gw * p

    # The continuous grid with `budget` cells and the image's aspect ratio; if one side
    # falls under a patch, it is clamped to 1 and the other takes the whole budget.
    ratio = width / height
    ideal_h, ideal_w = math.sqrt(budget / ratio), math.sqrt(budget * ratio)
    if ideal_h < 1:
        ideal_h, ideal_w = 1.0, float(budget)
    elif ideal_w < 1:
        ideal_h, ideal_w = float(budget), 1.0
    gh, gw = _best_grid(ideal_h, ideal_w, budget, min_image_tokens, max_image_tokens)
    return gh * p, gw * p


def _best_grid(ideal_h: float, ideal_w: float, budget: int, lo: int,
               hi: int | None) -> tuple[int, int]:
    """The integer grid nearest (ideal_h, ideal_w) whose cell count is within [lo, hi].

    "Nearest" is in ratio, side by side: the grid minimizing the larger of
    |log(h / ideal_h)| and |log(w / ideal_w)|, which is half of (aspect error + count
    error) in log scale. Preferring aspect alone would trade most of the budget for a
    sliver of aspect (17601 x 70 at 1000 tokens: 251 x 1 over 500 x 2); preferring the
    count alone would distort. Ties go to the smaller aspect error, then to fewer rows.

    Candidates fix one side at the floor or ceil of its ideal and give the other the
    length nearest the ideal aspect that the bounds allow. Fixing each side in turn
    matters when one is short: for an ideal 13.5 x 1.2 with at least 16 tokens, 16 x 1
    keeps the aspect far better than 13 x 2 or 14 x 2. If no length next to the ideal admits a count
    within the bounds (a narrow window such as min = max = a prime), lengths further away
    are tried; a side of 1 always works.
    """
    ratio = ideal_w / ideal_h

    def other_sides(n: int, per: float) -> set[int]:
        # given n cells along one side, the lengths of the other side nearest n * per
        o_lo = -(-lo // n)
        o_hi = hi // n if hi is not None else None
        if o_hi is not None and o_lo > o_hi:
            return set()
        ideal = n * per
        near = {math.floor(ideal), math.ceil(ideal)}
        return {max(o_lo, o if o_hi is None else min(o_hi, o)) for o in near}

    def grids(hs: list[int], ws: list[int]) -> list[tuple[int, int]]:
        hs = [h for h in hs if h >= 1 and (hi is None or h <= hi)]
        ws = [w for w in ws if w >= 1 and (hi is None or w <= hi)]
        return ([(h, w) for h in hs for w in other_sides(h, ratio)]
                + [(h, w) for w in ws for h in other_sides(w, 1 / ratio)])

    def score(hw: tuple[int, int]) -> tuple[float, float, int]:
        h, w = hw
        aspect_err = abs(math.log(w / h / ratio))
        return aspect_err + abs(math.log(h * w / budget)), aspect_err, h

    h0, w0 = math.floor(ideal_h), math.floor(ideal_w)
    found = grids([h0, h0 + 1], [w0, w0 + 1])
    step = 1
    while not found:
        found = grids([h0 - step, h0 + 1 + step], [w0 - step, w0 + 1 + step])
        step += 1
    return min(found, key=score)


# tensors

def to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 tensor in [0, 1]."""
    if not isinstance(pil_image, Image.Image):
        raise TypeError(f"to_tensor expects a PIL image, got {type(pil_image).__name__}")
    if pil_image.mode != "RGB":
        raise ValueError(f"to_tensor expects an RGB image, got mode {pil_image.mode!r}; "
                         "load_image() converts any mode (and composites alpha)")
    hwc = np.asarray(pil_image, dtype=np.uint8)
    chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    return chw.to(torch.float32).div_(255.0)


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, H, W) -> (tensor - mean) / std per channel, as a new tensor."""
    if tensor.ndim != 3 or tensor.shape[0] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize: expected (C, H, W) with C = len(mean) = len(std), got "
                         f"shape {tuple(tensor.shape)}, {len(mean)} means, {len(std)} stds")
    if any(s == 0 for s in std):
        raise ValueError(f"normalize: std must be non-zero, got {tuple(std)}")
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)[:, None, None]
    return (tensor - mean_t) / std_t


def _check_ready(t: torch.Tensor, patch_size: int, channels: int, min_image_tokens: int,
                 max_image_tokens: int | None) -> None:
    shape = tuple(t.shape)
    if t.ndim != 3:
        raise ValueError(f"preprocess: a tensor must be (C, H, W), got shape {shape}")
    if not t.is_floating_point():
        raise ValueError(f"preprocess: a tensor must be float (already normalized), got "
                         f"{t.dtype} of shape {shape}")
    c, h, w = shape
    if c != channels:
        raise ValueError(f"preprocess: expected {channels} channels (len(mean)), got shape {shape}")
    if h < 1 or w < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"preprocess: H and W must be positive multiples of patch_size="
                         f"{patch_size}, got shape {shape}")
    tokens = (h // patch_size) * (w // patch_size)
    if tokens < min_image_tokens or (max_image_tokens is not None and tokens > max_image_tokens):
        raise ValueError(f"preprocess: shape {shape} gives {tokens} tokens at patch_size="
                         f"{patch_size}, outside [{min_image_tokens}, {max_image_tokens}]")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"preprocess: tensor of shape {shape} holds NaN or infinite values")


def preprocess(
    image: ImageSource | torch.Tensor,
    patch_size: int,
    *,
    min_image_tokens: int = 1,
    max_image_tokens: int | None = None,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    resample: Image.Resampling = Image.Resampling.BICUBIC,
    background: Sequence[int] = _WHITE,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """One image -> (3, H, W) float32 tensor, resized to `target_size` and normalized.

    `image` is anything `load_image` takes, or a (C, H, W) float tensor that is already
    resized and normalized: that is validated against the patch size, the token bounds
    and `len(mean)` channels, and returned unchanged (the same object).
    """
    patch_size = _positive_int(patch_size, "patch_size")
    if isinstance(image, torch.Tensor):
        min_image_tokens, max_image_tokens = _token_bounds(min_image_tokens, max_image_tokens)
        _check_ready(image, patch_size, len(mean), min_image_tokens, max_image_tokens)
        return image
    img = load_image(image, background=background, max_pixels=max_pixels)
    H, W = target_size(img.height, img.width, patch_size,
                       min_image_tokens=min_image_tokens, max_image_tokens=max_image_tokens)
    if (H, W) != (img.height, img.width):
        img = img.resize((W, H), resample=resample)
    return normalize(to_tensor(img), mean, std)
