"""Shape-grouped batching for any HF vision model, and the original toolkit's API on top.

Grouping images by exact shape is exact by construction: every forward sees a batch of
identical-shape images, which is what the model sees for each image alone. It works
for every family, ViT or CNN (ConvNeXt, ResNet, MobileViT, Swin, ...); what differs
per family (cropping, how to call, token grid) is the table in `mixres.model_calls`.

    encode_nested(model, nested, image_sizes=None, max_batch_pixels=None)
        nested lists of CHW tensors (or padded tensors + true sizes) -> the same nesting
        of per-image tokens (n_i, D); a CNN's feature map comes back as (h*w, C)
    GroupedEncoder  backend "grouped" of `mixres.load_encoder` -> PackedFeatures

The original toolkit's functions keep their names and meaning:

    encode_images(image_encoder, input_images (B, L, C, H, W), dims (B, L, 2)) -> (B, L, D)
    encode_images_group / encode_images_sequentially / encode_images_batch -> (N, D)

D is the image embedding: the model's `pooler_output` (flattened) when it has one,
else the mean of the last hidden state over its token / spatial positions.
`encode_images` and `encode_images_group` take the fastest exact route of the model's
family (`ROUTES`: packed varlen for ViT-family, NaViT natively) and fall back to the
grouped route when that backend is not installed or does not take the model.

Sizes. Patch-embedding models (ViT, CLIP, SigLIP, DINOv2/v3) drop the pixels past
the last whole patch (their stride-p conv ignores them), so images are cropped to the
floor multiple of the patch first: same result, and more images share a shape. An image
smaller than one patch makes the unmodified model fail on it alone; here it raises a
ValueError naming the image (no silent padding that would invent an embedding). Swin
pads internally and CNNs use every pixel: their images keep their exact size.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from mixres import vision_utils
from mixres.encoders import load_encoder, register_backend
from mixres.encoders.base import Encoder
from mixres.model_calls import call_for, family, output_tokens, vision_tower
from mixres.packing import PackedFeatures, PackedImages, seqlens_to_cu

__all__ = ["encode_nested", "encode_images", "encode_images_group", "encode_images_sequentially",
           "encode_images_batch", "run_grouped", "GroupedEncoder", "ROUTES"]


# helpers

def _model_of(image_encoder) -> nn.Module:
    if isinstance(image_encoder, Encoder):
        return image_encoder.model
    if isinstance(image_encoder, nn.Module):
        return image_encoder
    raise TypeError(f"expected an HF vision model (nn.Module) or a mixres Encoder, "
                    f"got {type(image_encoder).__name__}")


def _params(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _grad_or_inference():
    # keep autograd when the caller asked for it (fine-tuning through the encoder)
    return nullcontext() if torch.is_grad_enabled() else torch.inference_mode()


def crop_for(model: nn.Module, image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """`image` (C, H, W) cropped as its family needs (floor multiple of the patch, or as is)."""
    tower = vision_tower(model)
    fc = call_for(tower)
    if image.ndim != 3:
        raise ValueError(f"{what}: expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
    _, H, W = image.shape
    low = fc.min_size(tower.config) if hasattr(tower, "config") else 1
    if H < low or W < low:
        raise ValueError(f"{what}: size {H}x{W} is smaller than one {low}x{low} patch of "
                         f"{family(tower) or type(tower).__name__}; the model cannot encode it "
                         f"alone either (pad or resize it first)")
    p = fc.crop(tower.config) if hasattr(tower, "config") else None
    return image[:, :H // p * p, :W // p * p] if p else image


# the grouped route

def run_grouped(model: nn.Module, images: Sequence[torch.Tensor], *,
                max_batch_pixels: int | None = None, select_layer: int = -1):
    """Run `model` on `images` (list of (C, H, W), already cropped) in same-shape batches.

    Returns, in input order, one (tokens (n, D), pooled (D',) or None, grid (h, w)) per
    image; select_layer=-k reads HF's hidden_states[-k] (no final norm, no pooled). A
    batch holds at most `max_batch_pixels` input pixels (an image larger than that runs
    alone); None puts a whole shape group in one batch.
    """
    tower = vision_tower(model)
    fc = call_for(tower)
    cfg = getattr(tower, "config", None)
    device, dtype = _params(tower)
    if max_batch_pixels is not None and max_batch_pixels <= 0:
        raise ValueError(f"max_batch_pixels must be positive, got {max_batch_pixels}")
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(fc.key(cfg, tuple(img.shape)), []).append(i)
    kw = {"output_hidden_states": True} if select_layer != -1 else {}
    results: list = [None] * len(images)
    for idx in groups.values():
        pixels = images[idx[0]].shape[-2] * images[idx[0]].shape[-1]
        per = len(idx) if max_batch_pixels is None else max(1, max_batch_pixels // max(pixels, 1))
        for s in range(0, len(idx), per):
            chunk = idx[s:s + per]
            batch = [images[i].to(device=device, dtype=dtype) for i in chunk]
            if len({tuple(b.shape) for b in batch}) == 1:
                out = fc.call(tower, torch.stack(batch), **kw)
            else:  # same key, different shapes: only families with call_list group like that
                out = fc.call_list(tower, batch, **kw)
            hidden = out.last_hidden_state if select_layer == -1 else out.hidden_states[select_layer]
            tokens, fmap_grid = output_tokens(hidden)
            # the pooler reads the last layer: it belongs to select_layer=-1 only (as in "packed")
            pooled = getattr(out, "pooler_output", None) if select_layer == -1 else None
            pooled = pooled.flatten(1) if pooled is not None else None
            for j, i in enumerate(chunk):
                _, H, W = images[i].shape
                if fmap_grid is not None:
                    grid = fmap_grid
                elif fc.grid is not None:
                    grid = fc.grid(cfg, H, W)
                else:  # unknown family with a sequence output: one row of tokens
                    grid = (1, tokens.shape[1])
                results[i] = (tokens[j], None if pooled is None else pooled[j], tuple(grid))
    return results


def _is_leaf(x) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 3


def encode_nested(model_or_encoder, nested, image_sizes=None, max_batch_pixels: int | None = None):
    """Encode a nested structure of images; outputs come back in the same structure.

    nested       a (C, H, W) tensor, a list/tuple of nested items, or a padded tensor
                 (..., C, H, W) whose leading dims are nesting levels
    image_sizes  None (images used whole), or the same nesting of true (h, w) sizes: a
                 (..., 2) tensor or lists; each image is cropped to [:h, :w] first and a
                 size with h = 0 or w = 0 marks an empty slot, which gets a (0, D) tensor
    max_batch_pixels  pixel budget of one forward (None: one batch per shape)

    Each leaf becomes the model's last hidden state for that image alone: (n_i, D) tokens
    (prefix tokens first), a CNN's (C, h, w) feature map as (h*w, C). With a mixres
    Encoder, its model and select_layer are used.
    """
    model = _model_of(model_or_encoder)
    select_layer = getattr(model_or_encoder, "select_layer", -1)
    flat: list = []  # (C, H, W) crops, None for empty slots

    def collect(item, sizes, where):
        if _is_leaf(item):
            img = item
            if sizes is not None:
                h, w = (int(v) for v in sizes)
                if h == 0 or w == 0:
                    flat.append(None)
                    return len(flat) - 1
                if h > img.shape[1] or w > img.shape[2]:
                    raise ValueError(f"image {where}: true size {h}x{w} exceeds its tensor "
                                     f"{img.shape[1]}x{img.shape[2]}")
                img = img[:, :h, :w]
            flat.append(crop_for(model, img, f"image {where}"))
            return len(flat) - 1
        if isinstance(item, torch.Tensor) and item.ndim < 3:
            raise ValueError(f"image {where}: expected (C, H, W) or a stack of them, got "
                             f"shape {tuple(item.shape)}")
        if not isinstance(item, (list, tuple, torch.Tensor)):
            raise TypeError(f"item {where}: expected a tensor or a list, got {type(item).__name__}")
        if sizes is not None and len(sizes) != len(item):
            raise ValueError(f"item {where}: image_sizes has {len(sizes)} entries for "
                             f"{len(item)} items")
        return [collect(x, None if sizes is None else sizes[k], where + (k,))
                for k, x in enumerate(item)]

    structure = collect(nested, image_sizes, ())
    real = [img for img in flat if img is not None]
    with _grad_or_inference():
        outs = iter(run_grouped(model, real, max_batch_pixels=max_batch_pixels,
                                select_layer=select_layer))
    tokens = [None if img is None else next(outs)[0] for img in flat]
    if any(t is None for t in tokens):
        like = next((t for t in tokens if t is not None), None)
        if like is None:  # all slots empty: ask the model for its width
            like = _probe_tokens(model, select_layer)
        tokens = [like.new_zeros(0, like.shape[-1]) if t is None else t for t in tokens]

    def rebuild(s):
        return tokens[s] if isinstance(s, int) else [rebuild(x) for x in s]
    return rebuild(structure)


def _probe_tokens(model: nn.Module, select_layer: int = -1) -> torch.Tensor:
    """Tokens of a blank 64x64 image (only to learn the width D when every slot is empty)."""
    channels = int(getattr(getattr(vision_tower(model), "config", None), "num_channels", 3))
    with torch.inference_mode():
        return run_grouped(model, [torch.zeros(channels, 64, 64)], select_layer=select_layer)[0][0]


# the "grouped" backend of load_encoder

@register_backend("grouped")
class GroupedEncoder(Encoder):
    """Shape-grouped execution of any HF vision model, as a `load_encoder` backend.

    Exact for every family (each forward is a batch of identical-shape images).
    `max_batch_tokens` bounds a forward at max_batch_tokens * stride^2 input pixels,
    where stride is the patch size, or a CNN's output stride (pixels per output token
    along a side). Tensors are cropped like the model itself would (see the module
    docstring); PIL images and paths are resized to multiples of the stride.

    PackedFeatures: tokens are each image's last hidden state (a CNN's feature map as
    (h*w, C)), grid_hw the output token grid (a CNN's feature-map grid), num_prefix
    the family's prefix tokens (0 for CNNs), pooled the flattened `pooler_output` or None.
    """

    @property
    def _tower(self) -> nn.Module:
        return vision_tower(self.model)

    @property
    def _config(self):
        return getattr(self._tower, "config", None)

    @property
    def patch_size(self) -> int | None:
        """The patch size of patch-embedding families, None for CNNs and windowed models."""
        return call_for(self._tower).crop(self._config)

    @property
    def stride(self) -> int | None:
        """Input pixels per output token along a side (None when the family is unknown)."""
        return call_for(self._tower).stride(self._config)

    @property
    def num_prefix(self) -> int:
        try:
            return vision_utils.num_prefix_tokens(self.model)
        except vision_utils.UnknownImageEncoderError:  # a family mixres has no row for
            return 0

    @property
    def grid_unit(self) -> int:
        # the resize policy of the base class, on the model's output stride (CNNs have no patch)
        if self.stride is None:
            raise ValueError(f"backend 'grouped': no resize policy for family "
                             f"{family(self.model)!r} (unknown output stride); pass normalized "
                             f"(C, H, W) tensors instead of PIL images or paths")
        return self.stride

    def encode(self, images) -> PackedFeatures:
        """Encode a list of images (CHW tensors, PIL images or paths) or PackedImages."""
        imgs = images.unpack() if isinstance(images, PackedImages) else self.prepare(images)
        if not imgs:
            raise ValueError("backend 'grouped': got an empty list of images")
        imgs = [crop_for(self.model, img, f"image {i}") for i, img in enumerate(imgs)]
        budget = None
        if self.max_batch_tokens is not None:
            budget = self.max_batch_tokens * (self.stride or 1) ** 2
        with _grad_or_inference():
            return self._features(run_grouped(self.model, imgs, max_batch_pixels=budget,
                                              select_layer=self.select_layer))

    __call__ = encode

    def forward(self, packed: PackedImages) -> PackedFeatures:
        return self._features(run_grouped(self.model, packed.unpack(), select_layer=self.select_layer))

    def _features(self, results) -> PackedFeatures:
        tokens = [t for t, _, _ in results]
        pooled = [p for _, p, _ in results]
        device = tokens[0].device
        return PackedFeatures(
            torch.cat(tokens), seqlens_to_cu([t.shape[0] for t in tokens], device=device),
            torch.tensor([g for _, _, g in results], dtype=torch.long, device=device),
            self.num_prefix, None if pooled[0] is None else torch.stack(pooled))


# the original toolkit's API: one embedding per image

# fastest exact route per family (vision_utils.family); anything else goes "grouped"
ROUTES: dict[str, str] = {
    "vit": "packed",
    "deit": "packed",
    "clip": "packed",
    "siglip": "packed",
    "siglip2": "packed",
    "dinov2": "packed",
    "dinov2_with_registers": "packed",
    "dinov3_vit": "packed",
    "navit": "navit",
}

# model -> {route: usable}; weak keys, so a model's entry goes with the model
_ROUTE_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the last few backend encoders built, reused across calls (the packed backend caches its
# position tables); an encoder holds its model, so this keeps at most that many alive
_ENCODERS: OrderedDict[tuple[int, str], Encoder] = OrderedDict()
_KEEP_ENCODERS = 4


def _route_encoder(model: nn.Module, route: str, strict: bool) -> Encoder | None:
    """The backend `route` for `model`, or None where it is not installed or not for it."""
    cached = _ENCODERS.get((id(model), route))
    if cached is not None and cached.model is model:
        _ENCODERS.move_to_end((id(model), route))
        return cached
    ok = _ROUTE_OK.setdefault(model, {})
    if ok.get(route) is False and not strict:
        return None
    try:
        enc = load_encoder(model, route)
    except (ImportError, ValueError, TypeError, NotImplementedError):
        # backend module not on this install, or the backend refuses this family
        if strict:
            raise
        ok[route] = False
        return None
    ok[route] = True
    _ENCODERS[(id(model), route)] = enc
    while len(_ENCODERS) > _KEEP_ENCODERS:
        _ENCODERS.popitem(last=False)
    return enc


def route_for(image_encoder) -> str:
    """The route `encode_images` takes for this model: "packed", "navit" or "grouped"."""
    model = _model_of(image_encoder)
    route = ROUTES.get(family(model), "grouped")
    if route != "grouped" and _route_encoder(model, route, strict=False) is None:
        return "grouped"
    return route


def _as_list(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images: expected (N, C, H, W) or a list of (C, H, W), got shape "
                             f"{tuple(images.shape)}")
        return list(images.unbind(0))
    return list(images)


def _embedding(tokens: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    # the mean over token / spatial positions equals vision_utils.pool_hidden_dim on the
    # model's (1, n, D) or (1, C, h, w) last hidden state
    return pooled if pooled is not None else tokens.mean(0)


def _width(model: nn.Module) -> int:
    """D of the embeddings, for outputs where every image is empty."""
    try:
        return vision_utils.image_encoder_size(model)
    except vision_utils.UnknownImageEncoderError:
        return _probe_tokens(model).shape[-1]


def encode_images_group(image_encoder, images, *, route: str | None = None,
                        max_batch_pixels: int | None = None) -> torch.Tensor:
    """(N, D) embeddings of `images` (list of (C, H, W), or (N, C, H, W)), exact.

    route  None: the family's fastest exact route (`ROUTES`, falling back to "grouped");
           or "grouped" / "packed" / "navit" explicitly (then errors are not swallowed)
    Images with a zero side get an all-zero embedding.
    """
    model = _model_of(image_encoder)
    imgs = _as_list(images)
    keep = [i for i, img in enumerate(imgs) if img.shape[-2] > 0 and img.shape[-1] > 0]
    crops = [crop_for(model, imgs[i], f"image {i}") for i in keep]
    with _grad_or_inference():
        embs = _encode_crops(model, crops, route, max_batch_pixels)
        if len(keep) == len(imgs):
            return embs if embs is not None else torch.zeros(0, _width(model))
        width = embs.shape[-1] if embs is not None else _width(model)
        device, dtype = _params(model)
        out = torch.zeros(len(imgs), width, device=device, dtype=dtype)
        if keep:
            out[keep] = embs
        return out


def _encode_crops(model, crops, route, max_batch_pixels) -> torch.Tensor | None:
    if not crops:
        return None
    name = route or route_for(model)
    if name == "grouped":
        res = run_grouped(model, crops, max_batch_pixels=max_batch_pixels)
        return torch.stack([_embedding(t, p) for t, p, _ in res])
    enc = _route_encoder(model, name, strict=True)
    p = enc.patch_size
    enc.max_batch_tokens = None if max_batch_pixels is None else max(1, max_batch_pixels // (p * p))
    feats = enc.encode([img[:, :img.shape[1] // p * p, :img.shape[2] // p * p] for img in crops])
    if feats.pooled is not None:
        return feats.pooled.flatten(1)
    return torch.stack([t.mean(0) for t in feats.unpack()])


def encode_images(image_encoder, input_images: torch.Tensor, input_images_dimensions: torch.Tensor,
                  *, route: str | None = None, max_batch_pixels: int | None = None) -> torch.Tensor:
    """(B, L, D) embeddings of zero-padded images (B, L, C, H, W) with true sizes (B, L, 2).

    Each image is cropped to its true (h, w) and encoded on its own terms (exact: equal
    to `encode_images_sequentially` on the crops); a slot with h = 0 or w = 0 is empty
    and gets an all-zero embedding. See `encode_images_group` for `route`.
    """
    if input_images.ndim != 5:
        raise ValueError(f"input_images: expected (B, L, C, H, W), got shape {tuple(input_images.shape)}")
    B, L, _, H, W = input_images.shape
    dims = torch.as_tensor(input_images_dimensions)
    if tuple(dims.shape) != (B, L, 2):
        raise ValueError(f"input_images_dimensions: expected shape ({B}, {L}, 2) to match "
                         f"input_images, got {tuple(dims.shape)}")
    sizes = dims.tolist()
    crops = []
    for b in range(B):
        for s in range(L):
            h, w = sizes[b][s]
            if h > H or w > W or h < 0 or w < 0:
                raise ValueError(f"input_images_dimensions[{b}, {s}] = ({h}, {w}) is outside the "
                                 f"padded image size {H}x{W}")
            crops.append(input_images[b, s, :, :h, :w])
    embs = encode_images_group(image_encoder, crops, route=route, max_batch_pixels=max_batch_pixels)
    return embs.reshape(B, L, -1)


def encode_images_sequentially(image_encoder, images) -> torch.Tensor:
    """(N, D): each image run through the unmodified model alone (the reference)."""
    model = _model_of(image_encoder)
    tower = vision_tower(model)
    fc = call_for(tower)
    device, dtype = _params(tower)
    embs: list[torch.Tensor | None] = []
    with _grad_or_inference():
        for img in _as_list(images):
            if img.shape[-2] == 0 or img.shape[-1] == 0:
                embs.append(None)
                continue
            if fc.whole_patches:  # SigLIP2 takes patches: what its processor would give
                img = crop_for(model, img)
            out = fc.call(tower, img[None].to(device=device, dtype=dtype).contiguous())
            pooled = getattr(out, "pooler_output", None)
            if pooled is not None:
                embs.append(pooled.flatten(1)[0])
            else:
                hidden = out.last_hidden_state
                embs.append(vision_utils.pool_hidden_dim(hidden, _width(model))[0])
        width = next((e.shape[-1] for e in embs if e is not None), None) or _width(model)
        return torch.stack([torch.zeros(width, device=device, dtype=dtype) if e is None else e
                            for e in embs]) if embs else torch.zeros(0, width)


def encode_images_batch(image_encoder, images) -> torch.Tensor:
    """(N, D) from ONE forward of all images zero-padded to a common size (the naive path).

    A list is zero-padded at the bottom/right and stacked; an (N, C, H, W) tensor is
    used as is. Not exact for images smaller than the batch size: padding changes the
    features. Kept as the baseline the exact routes are measured against.
    """
    model = _model_of(image_encoder)
    tower = vision_tower(model)
    device, dtype = _params(tower)
    if isinstance(images, torch.Tensor):
        batch = images
    else:
        imgs = list(images)
        if not imgs:
            return torch.zeros(0, _width(model))
        H = max(img.shape[-2] for img in imgs)
        W = max(img.shape[-1] for img in imgs)
        batch = imgs[0].new_zeros(len(imgs), imgs[0].shape[0], H, W)
        for i, img in enumerate(imgs):
            batch[i, :, :img.shape[-2], :img.shape[-1]] = img
    fc = call_for(tower)
    if fc.whole_patches:  # SigLIP2 takes whole patches only
        p = fc.crop(tower.config)
        batch = batch[..., :batch.shape[-2] // p * p, :batch.shape[-1] // p * p]
    with _grad_or_inference():
        out = fc.call(tower, batch.to(device=device, dtype=dtype))
        tokens, _ = output_tokens(out.last_hidden_state)
        pooled = getattr(out, "pooler_output", None)
        return pooled.flatten(1) if pooled is not None else tokens.mean(1)
