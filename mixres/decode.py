"""Decoders: image bytes -> the (3, H, W) tensor the encoder takes, three ways.

    pil   `mixres.images.preprocess`: PIL decode, EXIF, every mode to RGB, PIL bicubic
          resize, normalize. The default, and the reference the others are measured against.
    fast  plain JPEGs (YCbCr, RGB or grayscale, no EXIF rotation) are decoded by libjpeg-turbo
          through simplejpeg, straight into the HWC layout the resize wants; when the image is
          at least 12x its target on both sides, in libjpeg's DCT domain at 1/2, 1/4 or 1/8
          scale (what PIL's JPEG draft mode does), down to no less than 6x the target, so the
          final filter still sees every detail it keeps; where the resize takes 2 or more
          decoded pixels per output pixel, chroma is replicated rather than interpolated
          (libjpeg's fast upsampling: the antialiasing filter is wider than the difference);
          everything else (PNG, WebP, CMYK, EXIF-rotated, ...) by `load_image` itself. Then
          one antialiased bicubic resize of the uint8 image in torch (the same kernel as PIL's:
          a = -0.5, support scaled by the reduction, rounded to 8 bits) and a fused normalize.
    cuda  the fast route's plan, with the JPEGs of a batch decoded together by nvJPEG
          (TorchCodec's `decode_jpeg(list, device="cuda")`) and every resize on the GPU.

Why simplejpeg and not TorchCodec's `decode_jpeg` on the CPU (benchmarks/torchcodec_decode.py,
the `mixres bench embed` decode harness, one core; benchmarks/README.md): on the mixed
200-1000 px set at 256 tokens the two are within the machine's noise (TorchCodec 0.75x to
1.07x of simplejpeg across runs), but TorchCodec cannot decode at reduced DCT scale (0.65x on
2400-4000 px JPEGs) and returns planar CHW, which the channels-last resize copies back to
HWC (0.59x at 4096 tokens, where little is resized). Where fast's time goes (per image, the
mixed set at 256 tokens): libjpeg-turbo 0.85 ms, of which entropy decoding alone is ~0.5
(what 1/8 DCT scale still costs), the resize 0.41, the rest 0.05; pil's whole path is ~4 ms.
fastdct was rejected: its error is biased, a mean 0.5/255 that no resize averages away.

Every decoder resizes to the same `target_size` of the same upright image, so the patch
grid of an image never depends on the decoder: features differ only by pixel differences.
All of them keep `load_image`'s guarantees: the decompression-bomb guard is read from the
header before any pixel is decoded, and a bad file raises `ImageLoadError` naming it (a
file the fast route cannot read goes through `load_image`, which says why).

Measured distance of `fast` from `pil` in [0, 1] pixel space (`mixres bench embed`, in
benchmarks/results/embed-cpu, 256 tokens): mean |d| 0.079/255 on scikit-image's photographs
as JPEG, 0.086/255 on the mixed 200-1000 px JPEGs, 0.066/255 on 2400-4000 px JPEGs (half of them
through the draft route); the worst image's mean 0.32/255, the largest single-pixel
differences 17, 20 and 13 /255. The tests hold each image's mean |d| within 1/255.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mixres.images import (
    _WHITE,
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    ImageSource,
    _check_background,
    _open,
    _pil_bomb_check_off,
    check_header_size,
    load_image,
    preprocess,
    target_size,
)
from mixres.registry import Registry

__all__ = ["DECODERS", "Decoder", "get_decoder"]

DECODERS = Registry("decoder")

_ORIENTATION = 0x0112  # EXIF tag
_DRAFT_MARGIN = 6  # a drafted JPEG keeps at least this many decoded pixels per output pixel: at 3
# the 1/8 scale (8x8 block means) left scikit-image's retina 0.93/255 from pil at 4 tokens; at 6
# the worst photo is 0.33/255, and the draft route takes 15-25 % longer (still 6-8x pil's speed)
_FAST_UPSAMPLE_FROM = 2  # decoded / target size on both sides from which chroma is replicated, not
# interpolated (from 1.5 the worst image's mean was 0.38/255, from 2 it is 0.20)
_PLAIN = ("YCbCr", "Gray", "RGB")  # JPEG colour spaces libjpeg-turbo turns into RGB as PIL does


class Decoder:
    """How one image becomes pixels. Subclasses override `pixels` (and `pixels_many`)."""

    name: str
    device = torch.device("cpu")

    def pixels(self, src: ImageSource, patch_size: int, *, min_image_tokens: int = 1,
               max_image_tokens: int | None = None, background: Sequence[int] = _WHITE,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1], resized to `target_size`, not normalized."""
        raise NotImplementedError

    def preprocess(self, src: ImageSource, patch_size: int, *, mean: Sequence[float] = (0.5,) * 3,
                   std: Sequence[float] = (0.5,) * 3, **kw) -> torch.Tensor:
        """(3, H, W) float32, normalized: what `mixres.images.preprocess` returns."""
        return _normalize(self.pixels(src, patch_size, **kw), mean, std)

    def preprocess_many(self, srcs: Sequence[ImageSource], patch_size: int,
                        **kw) -> list[torch.Tensor | ImageLoadError]:
        """`preprocess` of each; a bad file gives its ImageLoadError in its place (the rest go on)."""
        out = []
        for src in srcs:
            try:
                out.append(self.preprocess(src, patch_size, **kw))
            except ImageLoadError as e:
                out.append(e)
        return out


def _normalize(pix: torch.Tensor, mean, std) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pix.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pix.device)[:, None, None]
    return pix.sub_(mean_t).div_(std_t)


@DECODERS.register("pil")
class PilDecoder(Decoder):
    """`mixres.images`: PIL decode and PIL bicubic resize (the reference)."""

    def pixels(self, src, patch_size, *, min_image_tokens=1, max_image_tokens=None, background=_WHITE,
               max_pixels=DEFAULT_MAX_PIXELS):
        # preprocess with mean 0, std 1 is its [0, 1] tensor: the very same code path
        return preprocess(src, patch_size, min_image_tokens=min_image_tokens,
                          max_image_tokens=max_image_tokens, mean=(0.0,) * 3, std=(1.0,) * 3,
                          background=background, max_pixels=max_pixels)

    def preprocess(self, src, patch_size, *, mean=(0.5,) * 3, std=(0.5,) * 3, **kw):
        return preprocess(src, patch_size, mean=mean, std=std, **kw)


# the fast route's plan for one file

class _Plan:
    """What the header says: the route (jpeg | draft | pil), the DCT scale, the target."""

    __slots__ = ("route", "data", "name", "img", "size", "scale", "target", "background", "max_pixels")

    def __init__(self, route, data, name, img, size, target, background, max_pixels, scale=1):
        self.route, self.data, self.name, self.img, self.size = route, data, name, img, size
        self.target, self.scale, self.background, self.max_pixels = target, scale, background, max_pixels

    def load_image(self) -> Image.Image:
        """`load_image` of the bytes, its errors naming this file."""
        try:
            return load_image(self.data, background=self.background, max_pixels=self.max_pixels)
        except ImageLoadError as e:
            raise ImageLoadError(self.name, e.reason) from None


def _may_rotate(data: bytes) -> bool:
    """True if the JPEG has an APP1 segment (EXIF or XMP: where an orientation lives) before its
    first scan, or markers this walk does not understand; False for a plain stream."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return True
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan: no APP1 before it
            return False
        elif marker == 0xE1:
            return True
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return True


def _upright(data: bytes) -> bool:
    """No EXIF/XMP rotation (PIL reads it the way ImageOps.exif_transpose does), read only where
    an APP1 segment exists; False for a header PIL cannot parse (load_image says why)."""
    if not _may_rotate(data):
        return True
    try:
        with _pil_bomb_check_off(), Image.open(io.BytesIO(data)) as img:
            return img.getexif().get(_ORIENTATION, 1) in (None, 1)
    except Exception:
        return False


def _plan(src: ImageSource, patch_size: int, min_image_tokens: int, max_image_tokens: int | None,
          background, max_pixels: int | None) -> _Plan:
    """Read the header only; anything unusual goes the `load_image` way (route "pil")."""
    opened, name = _open(src)
    if isinstance(opened, io.BytesIO):
        data = opened.getvalue()
        if data[:3] == b"\xff\xd8\xff":  # a JPEG stream
            try:
                h, w, colorspace, _ = _simplejpeg().decode_jpeg_header(data)
            except ValueError:  # a broken header: load_image knows what to say
                colorspace = None
            if colorspace in _PLAIN and _upright(data):
                check_header_size(name, w, h, max_pixels)
                H, W = target_size(h, w, patch_size, min_image_tokens=min_image_tokens,
                                   max_image_tokens=max_image_tokens)
                scale = 1
                while scale < 8 and min(w // (2 * scale * _DRAFT_MARGIN * W),
                                        h // (2 * scale * _DRAFT_MARGIN * H)) >= 1:
                    scale *= 2
                return _Plan("draft" if scale > 1 else "jpeg", data, name, None, (h, w), (H, W),
                             background, max_pixels, scale)
        # everything else: load_image's own decode (modes, alpha, EXIF), then the same resize
        plan = _Plan("pil", data, name, None, None, None, background, max_pixels)
        plan.img = plan.load_image()
    else:  # a PIL image
        plan = _Plan("pil", None, name, load_image(opened, background=background, max_pixels=max_pixels),
                     None, None, background, max_pixels)
    plan.size = (plan.img.height, plan.img.width)
    plan.target = target_size(*plan.size, patch_size, min_image_tokens=min_image_tokens,
                              max_image_tokens=max_image_tokens)
    return plan


def _hwc_to_nchw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, h, w) uint8 view in channels-last memory (what the fast resize wants)."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    with warnings.catch_warnings():  # PIL's array is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        hwc = torch.from_numpy(arr)
    return hwc.permute(2, 0, 1)[None]


@cache
def _torchcodec_jpeg():
    try:
        from torchcodec.decoders import decode_jpeg
    except ImportError as e:  # also a torchcodec built for another torch: it fails to load its ops
        raise ValueError(f"the cuda decoder needs torchcodec ({e}); pip install 'mixres[decode]'") from None
    return decode_jpeg


@cache
def _simplejpeg():
    try:
        import simplejpeg
    except ImportError as e:
        raise ValueError(f"the fast and cuda decoders need simplejpeg ({e}); "
                         "pip install 'mixres[decode]'") from None
    return simplejpeg


def _decode_cpu(plan: _Plan) -> torch.Tensor:
    """(1, 3, h, w) uint8 of the plan's image, in channels-last memory."""
    if plan.route == "pil":
        return _hwc_to_nchw(plan.img)
    (h, w), s, (H, W) = plan.size, plan.scale, plan.target
    # libjpeg's fancy upsampling interpolates the half-size chroma planes with a triangle
    # filter; where the resize then takes 2 or more decoded pixels per output pixel on both
    # sides, its antialiasing filter is wider than that difference, so the fast (replicating)
    # upsampling is used: 4 % of the route's time for a mean 0.08/255 (measured, 256 tokens)
    coarse = min(h / s / H, w / s / W) >= _FAST_UPSAMPLE_FROM
    try:
        # min_factor and the minimum sizes pin the scale to exactly 1/s
        arr = _simplejpeg().decode_jpeg(plan.data, colorspace="RGB", fastupsample=coarse, min_factor=s,
                                        min_height=-(-h // s), min_width=-(-w // s))
    except ValueError:
        # truncated or corrupt: load_image gives the one-line reason (or, should libjpeg
        # through PIL be more lenient, the image)
        return _hwc_to_nchw(plan.load_image())
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def _resize_u8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, h, w) uint8 -> (3, H, W) uint8, bicubic with antialiasing as PIL does it."""
    if tuple(x.shape[-2:]) != tuple(size):
        if x.device.type == "cpu":
            # uint8 channels-last is torch's vectorized path: PIL's kernel, rounded to 8 bits
            x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=size,
                              mode="bicubic", antialias=True)
        else:  # CUDA resizes floats; round and clip to 8 bits as PIL does
            x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True).round_().clamp_(0, 255)
    return x[0]


def _to_float(x: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """(3, H, W) uint8 (any layout) -> contiguous float32: x / 255, or normalized (x / 255 - mean) / std.

    One copy for the layout and the dtype, then one multiply and one add in place
    (measured faster than addcmul with broadcast channel constants).
    """
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)
    if mean is None:
        return out.div_(255.0)
    scale, shift = _affine(tuple(map(float, mean)), tuple(map(float, std)), x.device)
    return out.mul_(scale).add_(shift)


@cache
def _affine(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) scale 1 / (255 std) and shift -mean / std, computed in float64 once per
    (mean, std, device): building them per image cost a tenth of the fast route's time."""
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(torch.float32).to(device)[:, None, None]
    shift = (-mean_t / std_t).to(torch.float32).to(device)[:, None, None]
    return scale, shift


def _failed(plan_name: str, e: Exception) -> ImageLoadError:
    return ImageLoadError(plan_name, f"cannot decode ({type(e).__name__}: {e})")


@DECODERS.register("fast")
class FastDecoder(Decoder):
    """libjpeg-turbo (simplejpeg, at reduced DCT scale for large images) for plain JPEGs, PIL
    for the rest; torch resize."""

    def __init__(self):
        _simplejpeg()  # say now, not per file, that simplejpeg is missing

    def _resized(self, src, patch_size, min_image_tokens=1, max_image_tokens=None, background=_WHITE,
                 max_pixels=DEFAULT_MAX_PIXELS) -> torch.Tensor:
        background = _check_background(background)
        plan = _plan(src, patch_size, min_image_tokens, max_image_tokens, background, max_pixels)
        try:
            return _resize_u8(_decode_cpu(plan), plan.target)
        finally:
            if plan.img is not None:
                plan.img.close()

    def pixels(self, src, patch_size, **kw):
        return _to_float(self._resized(src, patch_size, **kw))

    def preprocess(self, src, patch_size, *, mean=(0.5,) * 3, std=(0.5,) * 3, **kw):
        return _to_float(self._resized(src, patch_size, **kw), mean, std)


@DECODERS.register("cuda")
class CudaDecoder(FastDecoder):
    """nvJPEG batches and GPU resizes; needs a CUDA GPU.

    `device="cpu"` runs the same batched code with libjpeg-turbo on the CPU (how it is tested
    on machines without a GPU).
    """

    def __init__(self, device: str | torch.device = "cuda"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--decode cuda needs a CUDA GPU; this machine has none")
        super().__init__()
        _torchcodec_jpeg()

    def pixels(self, src, patch_size, **kw):
        out = self.pixels_many([src], patch_size, **kw)[0]
        if isinstance(out, ImageLoadError):
            raise out
        return out

    def preprocess(self, src, patch_size, **kw):
        out = self.preprocess_many([src], patch_size, **kw)[0]
        if isinstance(out, ImageLoadError):
            raise out
        return out

    def preprocess_many(self, srcs, patch_size, *, mean=(0.5,) * 3, std=(0.5,) * 3, **kw):
        return [x if isinstance(x, ImageLoadError) else _to_float(x, mean, std)
                for x in self._resized_many(srcs, patch_size, **kw)]

    def pixels_many(self, srcs, patch_size, **kw) -> list[torch.Tensor | ImageLoadError]:
        """Pixels in [0, 1] of each source on `self.device`; a bad file gives its ImageLoadError."""
        return [x if isinstance(x, ImageLoadError) else _to_float(x)
                for x in self._resized_many(srcs, patch_size, **kw)]

    def _resized_many(self, srcs, patch_size, *, min_image_tokens=1, max_image_tokens=None,
                      background=_WHITE, max_pixels=DEFAULT_MAX_PIXELS) -> list:
        decode_jpeg = _torchcodec_jpeg()
        background = _check_background(background)
        out: list = [None] * len(srcs)
        plans = {}
        for i, src in enumerate(srcs):
            try:
                plans[i] = _plan(src, patch_size, min_image_tokens, max_image_tokens, background, max_pixels)
            except ImageLoadError as e:
                out[i] = e
        batch = [i for i, p in plans.items() if p.route == "jpeg"]
        decoded = {}
        if batch:
            bufs = [torch.frombuffer(bytearray(plans[i].data), dtype=torch.uint8) for i in batch]
            try:
                decoded = dict(zip(batch, decode_jpeg(bufs, mode="RGB", device=self.device)))
            except RuntimeError:
                decoded = {}  # one bad file fails the batch: decode one by one below
        for i, plan in plans.items():
            try:
                x = decoded[i][None] if i in decoded else _decode_cpu(plan).to(self.device)
                out[i] = _resize_u8(x, plan.target)
            except ImageLoadError as e:
                out[i] = e
            except Exception as e:  # a decoder bug on a weird file is that file's problem
                out[i] = _failed(plan.name, e)
            finally:
                if plan.img is not None:
                    plan.img.close()
        return out


@cache
def get_decoder(name: str = "pil") -> Decoder:
    """The decoder registered as `name` (one instance per process). Raises ValueError (one line)
    for an unknown name, or for `cuda` on a machine without a CUDA GPU."""
    return DECODERS.get(name)()
