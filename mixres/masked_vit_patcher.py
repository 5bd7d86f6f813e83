"""Padding-invariant HF ViT: zero-padded mixed-size batches give each image's own features.

`patch_vit(model)` makes a `ViTModel`, `ViTForImageClassification` or
`ViTForMaskedImageModeling` (transformers >= 5.17) accept a zero-padded batch of images
of different sizes, content at the top-left, plus `image_sizes` (B, 2: true H, W in
pixels). Each image's tokens then equal the unmodified model run on that image alone with
`interpolate_pos_encoding=True`, and every output at a padded position is exactly zero.
`unpatch_vit(model)` puts the model back as it was. `backend="masked"`
(`mixres.encoders.masked`) runs this for `mixres.load_encoder`.

How the three differences between "padded batch" and "image alone" are removed:
- attention: padded patches are dropped from the keys through the model's own
  `attention_mask` argument, a (B, L) key mask that HF's `create_bidirectional_mask`
  turns into whatever the configured attention (SDPA, flash, flex, eager) wants, so the
  fast kernels stay in use and no (layers, heads, L, L) tensor is built. A padded query
  still attends to its image's valid keys (always at least the CLS token, so no row is
  fully masked and SDPA never produces NaN); its output is thrown away (zeroed) after
  every layer, so nothing it computes reaches a valid token;
- position encodings: each image gets the encodings HF would interpolate for an image of
  its content size alone (same function, same bicubic arithmetic), computed once per
  distinct content grid, cached per grid while the position table is unchanged, and
  scattered into the padded grid with one gather;
- outputs: the embeddings, every layer's output (so every `hidden_states` entry), the
  final norm and the pooler / logits of images with no content are zeroed at padded
  positions.

Why explicit `image_sizes`: without them the content size is guessed from the pixels (a
patch is padding when all its pixels equal `pad_value`, and only patches beyond the
bounding box of the non-padding patches, i.e. at the bottom/right, count). Real content
can be exactly `pad_value` (a black border after normalization to 0, a letterboxed
photo), and then the guess cuts it off and changes the image's features. Sizes are
the only safe choice; the guess is a convenience for images that are known not to
touch the pad value at their borders.

Why instance attributes and hooks, not a subclass: the patch replaces `forward` on the
instance (the ViTModel's, the embeddings', and the task head's) and adds forward hooks on
the ViT layers. Swapping `__class__` to a subclass would break transformers' output
capture (`hidden_states` recording is registered per class name when a model is built,
so a swapped-in subclass would silently return none) and anything that
checks `type(model)`; changing the HF classes would change every other ViT in the
process. Instance attributes touch only this model, and `unpatch_vit` removes them.
The layer hooks are prepended so that HF's own `hidden_states` capture hooks (installed
lazily, possibly before or after patching) always see the zeroed outputs.

`ViTForMaskedImageModeling`: HF's forward reshapes the tokens to a square grid, so it
only runs on square images. The patched forward decodes the padded (rows, cols) grid
instead; the reconstruction of each image's content region equals the standalone one
wherever HF can run the image alone (square content grid) and is per-token elsewhere;
pixels outside the content region are zero, and the masked-image loss (with
`bool_masked_pos`) counts content pixels only.

Gradient checkpointing works (outputs and gradients as without it). One limit: on
transformers 5.17, whose checkpointing wraps a layer's hooks too (5.23 wraps only
`forward`), reentrant checkpointing (`use_reentrant=True`) recomputes the layers without
the zeroing, so a loss that reads the (zero) padded rows of intermediate `hidden_states`
sends gradient through them; losses on valid tokens, the last layer and the pooled output
are exact.

Not thread-safe for concurrent forwards of one patched instance (the per-call masks live
on the instance while a forward runs); separate instances are independent.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput, MaskedImageModelingOutput
from transformers.models.vit.modeling_vit import (
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
)

from mixres.packing import resample_table

__all__ = ["patch_vit", "unpatch_vit", "is_patched", "patched", "content_grid"]


_ATTR = "_mixres_masked_patch"  # the only attribute a patch adds to each module it touches


# per-call state and the record of one patch

@dataclass
class _Call:
    grid: torch.Tensor  # (B, 2) long content grid (rows, cols)
    keep: torch.Tensor  # (B, L) bool: tokens whose outputs are kept (CLS of a non-empty image, content)
    padded_grid: tuple[int, int]


@dataclass
class _Patch:
    """What a patch changed on one module, so that `unpatch_vit` can undo exactly that."""

    had_forward: bool  # whether the instance had its own `forward` before (kept and restored)
    old_forward: object = None
    hook_id: int | None = None  # a layer's zeroing hook (removed by id: handles do not survive deepcopy)
    call: _Call | None = None  # set while a patched forward runs
    pending: tuple | None = None  # (image_sizes, pad_value) handed down by a task head's forward
    pad_value: float = 0.0
    pos_cache: dict = field(default_factory=dict)
    last_grid: torch.Tensor | None = None  # content grid of the latest call, for the task heads
    owner: _Patch | None = None  # the ViTModel's record, whose `call` a submodule reads

    def current_call(self) -> _Call | None:
        return (self.owner or self).call

    def original_forward(self, module: nn.Module):
        return self.old_forward if self.had_forward else type(module).forward.__get__(module)


def _set_forward(module: nn.Module, fn, **rec_kwargs) -> _Patch:
    had = "forward" in module.__dict__
    rec = _Patch(had_forward=had, old_forward=module.__dict__.get("forward"), **rec_kwargs)
    setattr(module, _ATTR, rec)
    module.forward = types.MethodType(fn, module)
    return rec


def _restore_forward(module: nn.Module) -> None:
    rec: _Patch = module.__dict__.pop(_ATTR)
    if rec.hook_id is not None:
        module._forward_hooks.pop(rec.hook_id, None)
        return
    if rec.had_forward:
        module.forward = rec.old_forward
    else:
        del module.forward


# content grids

def content_grid(pixel_values: torch.Tensor, patch_size: int, image_sizes=None,
                 pad_value: float = 0.0) -> torch.Tensor:
    """(B, 2) long content grid (rows, cols) of each image of a zero-padded batch.

    With `image_sizes` (B, 2) true heights and widths in pixels: floor(size / patch), the
    grid HF's patch convolution gives that image alone. Without: every patch whose pixels
    all equal `pad_value` is padding, and the grid is the bounding box of the other
    patches (so padding is only ever found at the bottom/right; see the module docstring
    for why this guess is unsafe for content that touches the pad value).
    """
    b, _, H, W = pixel_values.shape
    gh, gw = H // patch_size, W // patch_size
    if image_sizes is not None:
        sizes = torch.as_tensor(image_sizes, device=pixel_values.device).long()
        if tuple(sizes.shape) != (b, 2):
            raise ValueError(f"image_sizes must be (batch, 2) = ({b}, 2) true (H, W) in pixels, "
                             f"got shape {tuple(sizes.shape)}")
        if bool((sizes < 0).any()) or bool((sizes[:, 0] > H).any()) or bool((sizes[:, 1] > W).any()):
            raise ValueError(f"image_sizes must lie in [0, {H}] x [0, {W}] (the padded pixel_values), "
                             f"got {sizes.tolist()}")
        return sizes // patch_size
    x = pixel_values[:, :, :gh * patch_size, :gw * patch_size]
    x = x.reshape(b, -1, gh, patch_size, gw, patch_size)
    content = (x != pad_value).any(dim=5).any(dim=3).any(dim=1)  # (B, gh, gw)
    rows = (content.any(2) * torch.arange(1, gh + 1, device=x.device)).amax(1)
    cols = (content.any(1) * torch.arange(1, gw + 1, device=x.device)).amax(1)
    return torch.stack([rows, cols], dim=1).long()


def _keep_mask(grid: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """(B, 1 + gh*gw) bool: the CLS of every image with content, and its content patches."""
    r = torch.arange(gh, device=grid.device)[None, :, None] < grid[:, 0, None, None]
    c = torch.arange(gw, device=grid.device)[None, None, :] < grid[:, 1, None, None]
    patches = (r & c).flatten(1)
    cls = (grid > 0).all(1, keepdim=True)
    return torch.cat([cls, patches], dim=1)


# position encodings

def _interpolated_pos(emb: nn.Module, h: int, w: int) -> torch.Tensor:
    """(1 + h*w, D): HF's `ViTEmbeddings.interpolate_pos_encoding` for an h x w grid alone
    (the same resampling, including its shortcut for the native square grid)."""
    pos = emb.position_embeddings[0]
    return torch.cat([pos[:1], resample_table(pos[1:], (h, w))])


def _padded_pos(emb: nn.Module, rec: _Patch, call: _Call) -> torch.Tensor:
    """(B, 1 + gh*gw, D) position encodings: each image's own, scattered into the padded grid."""
    pos = emb.position_embeddings
    gh, gw = call.padded_grid
    grids, inverse = torch.unique(call.grid, dim=0, return_inverse=True)
    # a cached encoding is only reused while it cannot be part of a graph being trained
    # and the table it came from is unchanged (same storage, same in-place version)
    cacheable = not (torch.is_grad_enabled() and pos.requires_grad)
    stamp = (pos.data_ptr(), pos._version, pos.dtype, pos.device, torch.is_inference_mode_enabled())
    if rec.pos_cache.get("stamp") != stamp:
        rec.pos_cache = {"stamp": stamp}
    table = pos.new_zeros(grids.shape[0], 1 + gh * gw, pos.shape[-1])
    for g, (h, w) in enumerate(grids.tolist()):
        if h == 0 or w == 0:
            continue  # no content: every token of this image is zeroed anyway
        one = rec.pos_cache.get((h, w)) if cacheable else None
        if one is None:
            one = _interpolated_pos(emb, h, w)
            if cacheable:
                rec.pos_cache[(h, w)] = one
        table[g, 0] = one[0]
        table[g, 1:].view(gh, gw, -1)[:h, :w] = one[1:].view(h, w, -1)
    return table[inverse]


# patched forwards

def _embeddings_forward(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=False):
    """ViTEmbeddings.forward with per-image position encodings and zeroed padding."""
    rec: _Patch = getattr(self, _ATTR)
    call = rec.current_call()
    if call is None:  # called on its own, outside a patched model forward
        return rec.original_forward(self)(pixel_values, bool_masked_pos, interpolate_pos_encoding)
    b = pixel_values.shape[0]
    embeddings = self.patch_embeddings(pixel_values)
    if bool_masked_pos is not None:
        mask_tokens = self.mask_token.expand(b, embeddings.shape[1], -1)
        mask = bool_masked_pos.unsqueeze(-1).type_as(mask_tokens)
        embeddings = embeddings * (1.0 - mask) + mask_tokens * mask
    embeddings = torch.cat((self.cls_token.expand(b, -1, -1), embeddings), dim=1)
    embeddings = embeddings + _padded_pos(self, rec, call)
    embeddings = embeddings.masked_fill(~call.keep[..., None], 0.0)
    return self.dropout(embeddings)


class _ZeroPadding(torch.autograd.Function):
    """x with padded rows zeroed; the mask rides on ctx, not in saved tensors.

    transformers 5.17 checkpoints a layer's whole `__call__`, hooks included, and
    recomputes it during backward, when no patched forward is running and the hook does
    nothing. Non-reentrant checkpointing compares the saved tensors of the forward and of
    the recomputation, so the zeroing must save none (a plain masked_fill saves its mask).
    """

    @staticmethod
    def forward(ctx, x, keep):
        ctx.drop = ~keep
        return x.masked_fill(ctx.drop, 0.0)

    @staticmethod
    def backward(ctx, grad):
        return grad.masked_fill(ctx.drop, 0.0), None


def _zero_padding_hook(module, args, output):
    """A ViT layer's forward hook: zero the layer's output at the padded positions.

    It finds the masks through the layer's own record (not a closure), so a deepcopy of a
    patched model hooks its own copy.
    """
    call = getattr(module, _ATTR).current_call()
    if call is None:
        return None
    keep = call.keep[..., None]
    if isinstance(output, tuple):
        return (_ZeroPadding.apply(output[0], keep), *output[1:])
    return _ZeroPadding.apply(output, keep)


def _vit_forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
                 attention_mask=None, image_sizes=None, pad_value=None, **kwargs):
    """ViTModel.forward on a zero-padded mixed-size batch (see `patch_vit`).

    image_sizes  (B, 2) true (H, W) in pixels of each image, content at the top-left;
                 None: guessed from pixels equal to `pad_value` (unsafe for content that
                 touches the pad value, see the module docstring)
    pad_value    the pad value for that guess (default: the one given to `patch_vit`)
    attention_mask, if given, is a (B, 1 + rows*cols) key mask combined with the padding.
    `interpolate_pos_encoding` is ignored: every image gets its own interpolated encodings.
    """
    rec: _Patch = getattr(self, _ATTR)
    if pixel_values is None:
        raise ValueError("patched ViTModel.forward: pixel_values is required")
    if image_sizes is None and pad_value is None and rec.pending is not None:
        image_sizes, pad_value = rec.pending
    pad_value = rec.pad_value if pad_value is None else pad_value
    p = _patch_size(self)
    gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
    grid = content_grid(pixel_values, p, image_sizes, pad_value)
    keep = _keep_mask(grid, gh, gw)
    # keys: the kept tokens plus every CLS, so an image without content still has one key
    keys = keep.clone()
    keys[:, 0] = True
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(keys.shape):
            raise ValueError(f"patched ViTModel.forward: attention_mask must be a (batch, 1 + rows*cols) = "
                             f"{tuple(keys.shape)} key mask, got {tuple(attention_mask.shape)}")
        keys = keys & attention_mask.to(keys.device).bool()
    return_dict = kwargs.pop("return_dict", getattr(self.config, "return_dict", True))
    rec.call = _Call(grid=grid, keep=keep, padded_grid=(gh, gw))
    try:
        out = rec.original_forward(self)(pixel_values, bool_masked_pos=bool_masked_pos,
                                         interpolate_pos_encoding=True, attention_mask=keys,
                                         return_dict=True, **kwargs)
    finally:
        rec.call = None
    out.last_hidden_state = out.last_hidden_state.masked_fill(~keep[..., None], 0.0)
    if out.pooler_output is not None:
        out.pooler_output = out.pooler_output.masked_fill(~keep[:, :1], 0.0)
    rec.last_grid = grid
    return out if return_dict else out.to_tuple()


def _patch_size(vit: ViTModel) -> int:
    p = vit.config.patch_size
    if not isinstance(p, int):
        if len(set(p)) != 1:
            raise ValueError(f"masked_vit_patcher: only square patches are supported, got patch_size={p}")
        p = p[0]
    return p


@contextlib.contextmanager
def _hand_down(vit: ViTModel, image_sizes, pad_value):
    """Let a task head's original forward call the patched ViTModel with these sizes."""
    rec: _Patch = getattr(vit, _ATTR)
    rec.pending = (image_sizes, pad_value)
    try:
        yield rec
    finally:
        rec.pending = None


def _classification_forward(self, pixel_values=None, labels=None, interpolate_pos_encoding=None,
                            attention_mask=None, image_sizes=None, pad_value=None, **kwargs):
    """ViTForImageClassification.forward on a padded batch; logits of empty images are zero."""
    rec: _Patch = getattr(self, _ATTR)
    return_dict = kwargs.pop("return_dict", getattr(self.config, "return_dict", True))
    with _hand_down(self.vit, image_sizes, pad_value) as vrec:
        out = rec.original_forward(self)(pixel_values, attention_mask=attention_mask,
                                         return_dict=True, **kwargs)
        empty = ~(vrec.last_grid > 0).all(1)
    logits = out.logits.masked_fill(empty[:, None], 0.0)
    loss = self.loss_function(labels, logits, self.config) if labels is not None else None
    out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                attentions=out.attentions)
    return out if return_dict else out.to_tuple()


def _mim_forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
                 attention_mask=None, image_sizes=None, pad_value=None, **kwargs):
    """ViTForMaskedImageModeling.forward on a padded (rows, cols) grid instead of HF's square one."""
    if bool_masked_pos is not None and self.config.patch_size != self.config.encoder_stride:
        raise ValueError("ViTForMaskedImageModeling: with bool_masked_pos, patch_size must equal "
                         f"encoder_stride, got {self.config.patch_size} and {self.config.encoder_stride}")
    return_dict = kwargs.pop("return_dict", getattr(self.config, "return_dict", True))
    out = self.vit(pixel_values, bool_masked_pos=bool_masked_pos, attention_mask=attention_mask,
                   image_sizes=image_sizes, pad_value=pad_value, return_dict=True, **kwargs)
    grid = getattr(self.vit, _ATTR).last_grid
    p, s = _patch_size(self.vit), self.config.encoder_stride
    b, _, H, W = pixel_values.shape
    gh, gw = H // p, W // p
    tokens = out.last_hidden_state[:, 1:]
    recon = self.decoder(tokens.transpose(1, 2).reshape(b, -1, gh, gw))  # (B, C, gh*s, gw*s)
    rows = torch.arange(recon.shape[2], device=recon.device)[None, :, None] < (grid[:, 0] * s)[:, None, None]
    cols = torch.arange(recon.shape[3], device=recon.device)[None, None, :] < (grid[:, 1] * s)[:, None, None]
    inside = (rows & cols)[:, None]  # (B, 1, gh*s, gw*s) content pixels
    recon = recon.masked_fill(~inside, 0.0)
    loss = None
    if bool_masked_pos is not None:
        mask = bool_masked_pos.reshape(b, gh, gw).repeat_interleave(p, 1).repeat_interleave(p, 2)
        mask = mask[:, None].to(recon.dtype) * inside
        target = pixel_values[:, :, :gh * p, :gw * p]
        l1 = nn.functional.l1_loss(target, recon, reduction="none")
        loss = (l1 * mask).sum() / (mask.sum() + 1e-5) / self.config.num_channels
    out = MaskedImageModelingOutput(loss=loss, reconstruction=recon, hidden_states=out.hidden_states,
                                    attentions=out.attentions)
    return out if return_dict else out.to_tuple()


# the task heads that can be patched, and how (the ViTModel inside is patched for all)
_HEADS = {
    ViTModel: None,
    ViTForImageClassification: _classification_forward,
    ViTForMaskedImageModeling: _mim_forward,
}


def _find_head(model: nn.Module):
    for cls, fwd in _HEADS.items():
        if isinstance(model, cls):
            return fwd
    raise TypeError(f"patch_vit: unsupported model {type(model).__name__}; expected one of "
                    f"{[c.__name__ for c in _HEADS]} (transformers >= 5.17)")


# public API

def is_patched(model: nn.Module) -> bool:
    return _ATTR in model.__dict__


def patch_vit(model: nn.Module, pad_value: float = 0.0) -> nn.Module:
    """Make `model` padding-invariant in place and return it.

    Patching a patched model changes nothing (its first `pad_value` stays).

    After patching, `model(pixel_values, image_sizes=sizes)` takes a zero-padded batch
    (B, C, H, W) with each image's content at the top-left and its true (H, W) in
    `sizes`; without `image_sizes`, padding is guessed from pixels equal to `pad_value`.
    """
    head_forward = _find_head(model)
    if is_patched(model):
        return model
    vit = model if isinstance(model, ViTModel) else model.vit
    if head_forward is not None and is_patched(vit):
        raise ValueError(f"patch_vit: the ViTModel inside this {type(model).__name__} is already patched "
                         "on its own; unpatch it first or patch only one of them")
    vrec = _set_forward(vit, _vit_forward, pad_value=float(pad_value))
    _set_forward(vit.embeddings, _embeddings_forward, owner=vrec)
    for layer in vit.layers:
        # prepended: HF's hidden_states capture hooks must see the zeroed output
        handle = layer.register_forward_hook(_zero_padding_hook, prepend=True)
        setattr(layer, _ATTR, _Patch(had_forward=False, hook_id=handle.id, owner=vrec))
    if head_forward is not None:
        _set_forward(model, head_forward)
    return model


def unpatch_vit(model: nn.Module) -> nn.Module:
    """Undo `patch_vit` exactly: original forwards back, hooks and added attributes gone."""
    _find_head(model)
    if not is_patched(model):
        return model
    vit = model if isinstance(model, ViTModel) else model.vit
    if vit is not model:
        _restore_forward(model)
    for layer in vit.layers:
        _restore_forward(layer)
    _restore_forward(vit.embeddings)
    _restore_forward(vit)
    return model


@contextlib.contextmanager
def patched(model: nn.Module, pad_value: float = 0.0):
    """Patch for the duration of a `with` block; a model patched before stays patched."""
    if is_patched(model):
        yield model
        return
    patch_vit(model, pad_value)
    try:
        yield model
    finally:
        unpatch_vit(model)


# backend="masked"
