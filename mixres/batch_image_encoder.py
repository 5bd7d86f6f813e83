"""The original toolkit's API, as a thin face over the engine (`mixres.encoders`).

    encode_nested(model, nested, image_sizes=None, max_batch_pixels=None)
        nested lists of CHW tensors (or padded tensors + true sizes) -> the same nesting
        of per-image tokens (n_i, D); a CNN's feature map comes back as (h*w, C)
    encode_images(image_encoder, input_images (B, L, C, H, W), dims (B, L, 2)) -> (B, L, D)
    encode_images_group / encode_images_sequentially / encode_images_batch -> (N, D)
    GroupedEncoder, run_grouped: the "grouped" backend (`mixres.encoders.grouped`)

D is the image embedding: the model's `pooler_output` (flattened) when it has one,
else the mean of the last hidden state over its token / spatial positions.
`encode_images` and `encode_images_group` take the fastest exact route of the model's
family (`FamilySpec.route`: "packed" where the family has a packed recipe, "navit" for
NaViT, else "grouped"); a backend that refuses the model, or a recipe that fails, raises
(never a silent detour through another route). Images are cropped as their family needs
(see `mixres.encoders.grouped`).
"""

from __future__ import annotations

import torch
from torch import nn

from mixres import families, vision_utils
from mixres.encoders import load_encoder
from mixres.encoders.base import Encoder
from mixres.encoders.grouped import (
    GroupedEncoder,
    call_for,
    crop_for,
    output_tokens,
    params_of,
    probe_tokens,
    run_grouped,
)
from mixres.encoders.whole import grad_or_inference
from mixres.families import vision_tower
from mixres.families.facts import model_facts
from mixres.packing import mean_pool

__all__ = ["encode_nested", "encode_images", "encode_images_group", "encode_images_sequentially",
           "encode_images_batch", "run_grouped", "crop_for", "route_for", "GroupedEncoder"]


def _model_of(image_encoder) -> nn.Module:
    if isinstance(image_encoder, Encoder):
        return image_encoder.model
    if isinstance(image_encoder, nn.Module):
        return image_encoder
    raise TypeError(f"expected an HF vision model (nn.Module) or a mixres Encoder, "
                    f"got {type(image_encoder).__name__}")


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
    with grad_or_inference():
        outs = iter(run_grouped(model, real, max_batch_pixels=max_batch_pixels,
                                select_layer=select_layer))
    tokens = [None if img is None else next(outs)[0] for img in flat]
    if any(t is None for t in tokens):
        like = next((t for t in tokens if t is not None), None)
        if like is None:  # all slots empty: ask the model for its width
            like = probe_tokens(model, select_layer)
        tokens = [like.new_zeros(0, like.shape[-1]) if t is None else t for t in tokens]

    def rebuild(s):
        return tokens[s] if isinstance(s, int) else [rebuild(x) for x in s]
    return rebuild(structure)


def route_for(image_encoder) -> str:
    """The route `encode_images` takes for this model: its family's `FamilySpec.route`
    ("packed", "navit", ...), "grouped" for a family mixres has no file for. A backend that
    then refuses the model raises: a family is never silently rerouted."""
    spec = families.spec_of(_model_of(image_encoder))
    return spec.route if spec is not None else "grouped"


def _as_list(images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images: expected (N, C, H, W) or a list of (C, H, W), got shape "
                             f"{tuple(images.shape)}")
        return list(images.unbind(0))
    return list(images)


def _embedding(tokens: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    # the mean over every token / spatial position (`mean_pool` with no skip) equals
    # vision_utils.pool_hidden_dim on the model's (1, n, D) or (1, C, h, w) last hidden state
    if pooled is not None:
        return pooled
    return mean_pool(tokens, torch.tensor([0, tokens.shape[0]]))[0]


def _width(model: nn.Module) -> int:
    """D of the embeddings, for outputs where every image is empty."""
    try:
        return model_facts(model).hidden_size
    except families.UnknownImageEncoderError:
        return probe_tokens(model).shape[-1]


def encode_images_group(image_encoder, images, *, route: str | None = None,
                        max_batch_pixels: int | None = None) -> torch.Tensor:
    """(N, D) embeddings of `images` (list of (C, H, W), or (N, C, H, W)), exact.

    route  None: the family's fastest exact route (`FamilySpec.route`, else "grouped");
           or "grouped" / "packed" / "navit" explicitly
    Images with a zero side get an all-zero embedding.
    """
    model = _model_of(image_encoder)
    imgs = _as_list(images)
    keep = [i for i, img in enumerate(imgs) if img.shape[-2] > 0 and img.shape[-1] > 0]
    crops = [crop_for(model, imgs[i], f"image {i}") for i in keep]
    with grad_or_inference():
        embs = _encode_crops(model, crops, route, max_batch_pixels)
        if len(keep) == len(imgs):
            return embs if embs is not None else torch.zeros(0, _width(model))
        width = embs.shape[-1] if embs is not None else _width(model)
        device, dtype = params_of(model)
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
    enc = load_encoder(model, name, max_batch_tokens=None)
    p = enc.patch_size
    if max_batch_pixels is not None:  # a fresh encoder with the budget (encoders are not mutated)
        enc = load_encoder(model, name, max_batch_tokens=max(1, max_batch_pixels // (p * p)))
    feats = enc.encode([img[:, :img.shape[1] // p * p, :img.shape[2] // p * p] for img in crops])
    if feats.pooled is not None:
        return feats.pooled.flatten(1)
    return mean_pool(feats.tokens, feats.cu_seqlens)  # prefix tokens too, as _embedding


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
    device, dtype = params_of(tower)
    embs: list[torch.Tensor | None] = []
    with grad_or_inference():
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
    device, dtype = params_of(tower)
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
    with grad_or_inference():
        out = fc.call(tower, batch.to(device=device, dtype=dtype))
        tokens, _ = output_tokens(out.last_hidden_state)
        pooled = getattr(out, "pooler_output", None)
        return pooled.flatten(1) if pooled is not None else tokens.mean(1)
