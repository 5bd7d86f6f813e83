"""Adapters: encoder tokens -> language-model tokens, packed in and packed out.

Every adapter takes a PackedFeatures (all images' tokens in one (N, D_enc) tensor with
offsets and grids) and returns a PackedFeatures in the LM width, never padded. Prefix
tokens (CLS, registers) are dropped by default, so an image brings exactly its grid's
worth of tokens (LLaVA's "patch" feature selection); `keep_prefix=True` keeps them.

    linear    one Linear per token
    mlp2      Linear-GELU-Linear (LLaVA-1.5)
    merge2x2  each 2x2 neighbourhood of an image's own patch grid -> one token (Qwen2-VL
              PatchMerger: LayerNorm, concat of 4, MLP); needs even grids, which the
              collator guarantees through `grid_multiple = 2`

`layout(tower)` gives the collator the plain values (`mixres.vlm.layout.ImageLayout`)
that tell how many LM positions an image takes before anything runs.
"""

from __future__ import annotations

import torch
from torch import nn

from mixres.packing import PackedFeatures, seqlens_to_cu
from mixres.vlm.layout import ImageLayout
from mixres.vlm.registry import ADAPTERS, register_adapter

__all__ = ["Adapter", "LinearAdapter", "MLP2Adapter", "Merge2x2Adapter", "build_adapter"]


# helpers

def _prefix_and_patch_index(feats: PackedFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of all prefix tokens and of all patch tokens in feats.tokens, image by image."""
    dev = feats.tokens.device
    starts = feats.cu_seqlens[:-1].to(dev).long()
    lens = (feats.cu_seqlens[1:] - feats.cu_seqlens[:-1]).to(dev).long()
    p = feats.num_prefix
    pre = (starts[:, None] + torch.arange(p, device=dev)[None]).reshape(-1)
    n_patch = lens - p
    owner = torch.repeat_interleave(torch.arange(len(lens), device=dev), n_patch)
    local = torch.arange(int(n_patch.sum()), device=dev) - torch.repeat_interleave(
        seqlens_to_cu(n_patch, device=dev)[:-1].long(), n_patch)
    return pre, starts[owner] + p + local


def _interleave(prefix: torch.Tensor, patches: torch.Tensor, n_prefix: int,
                patch_counts: torch.Tensor) -> torch.Tensor:
    """Per image: its n_prefix prefix rows, then its patch rows (the HF token order)."""
    b = patch_counts.numel()
    lens = patch_counts + n_prefix
    starts = seqlens_to_cu(lens, device=patches.device)[:-1].long()
    out = patches.new_empty(int(lens.sum()), patches.shape[1])
    pre_dst = (starts[:, None] + torch.arange(n_prefix, device=patches.device)[None]).reshape(-1)
    owner = torch.repeat_interleave(torch.arange(b, device=patches.device), patch_counts)
    local = torch.arange(patches.shape[0], device=patches.device) - torch.repeat_interleave(
        seqlens_to_cu(patch_counts, device=patches.device)[:-1].long(), patch_counts)
    out = out.index_copy(0, pre_dst, prefix)
    return out.index_copy(0, starts[owner] + n_prefix + local, patches)


# adapters

class Adapter(nn.Module):
    """Base: a per-token map applied to the selected tokens; subclasses set `self.net`."""

    grid_multiple = 1  # the collator makes every grid side a multiple of this
    merge = 1          # each merge x merge block of patches becomes one LM token
    name = "adapter"

    def __init__(self, in_dim: int, out_dim: int, keep_prefix: bool = False):
        super().__init__()
        self.in_dim, self.out_dim, self.keep_prefix = in_dim, out_dim, keep_prefix

    def layout(self, tower, min_image_tokens: int = 1, max_image_tokens: int | None = 1024) -> ImageLayout:
        """The plain values the collator needs for this adapter on `tower`."""
        mean, std = tower.mean_std
        return ImageLayout(tower.patch_size, self.grid_multiple, self.merge,
                           tower.num_prefix if self.keep_prefix else 0, tuple(mean), tuple(std),
                           min_image_tokens, max_image_tokens)

    def _check(self, feats: PackedFeatures) -> None:
        if feats.tokens.ndim != 2 or feats.tokens.shape[1] != self.in_dim:
            raise ValueError(f"{type(self).__name__}: expected packed tokens (N, {self.in_dim}), "
                             f"got {tuple(feats.tokens.shape)}")

    def forward(self, feats: PackedFeatures) -> PackedFeatures:
        self._check(feats)
        if self.keep_prefix or feats.num_prefix == 0:
            tokens, prefix = feats.tokens, feats.num_prefix
        else:
            tokens, prefix = feats.tokens[_prefix_and_patch_index(feats)[1]], 0
        lens = feats.grid_hw.prod(-1).to(feats.cu_seqlens) + prefix
        return PackedFeatures(self.net(tokens), seqlens_to_cu(lens, device=feats.cu_seqlens.device),
                              feats.grid_hw, prefix)


@register_adapter("linear")
class LinearAdapter(Adapter):
    def __init__(self, in_dim: int, out_dim: int, keep_prefix: bool = False):
        super().__init__(in_dim, out_dim, keep_prefix)
        self.net = nn.Linear(in_dim, out_dim)


@register_adapter("mlp2")
class MLP2Adapter(Adapter):
    def __init__(self, in_dim: int, out_dim: int, keep_prefix: bool = False, hidden: int | None = None):
        super().__init__(in_dim, out_dim, keep_prefix)
        hidden = hidden or out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


@register_adapter("merge2x2")
class Merge2x2Adapter(Adapter):
    """Qwen2-VL's PatchMerger on packed grids: each image's (h, w) grid -> (h/2, w/2)."""

    grid_multiple = 2
    merge = 2

    def __init__(self, in_dim: int, out_dim: int, keep_prefix: bool = False, eps: float = 1e-6):
        super().__init__(in_dim, out_dim, keep_prefix)
        self.norm = nn.LayerNorm(in_dim, eps=eps)
        self.net = nn.Sequential(nn.Linear(4 * in_dim, 4 * in_dim), nn.GELU(),
                                 nn.Linear(4 * in_dim, out_dim))
        # prefix tokens have no 2x2 neighbourhood; they get their own projection
        self.prefix_proj = nn.Linear(in_dim, out_dim) if keep_prefix else None

    @staticmethod
    def _merge_order(grid_hw: torch.Tensor, device) -> torch.Tensor:
        """Order of patch positions so that every 4 consecutive form one 2x2 block,
        blocks row-major over the merged grid; offsets are into the patch tokens only."""
        parts, base = [], 0
        for i, (h, w) in enumerate(grid_hw.tolist()):
            if h % 2 or w % 2:
                raise ValueError(f"merge2x2: image {i} has an odd patch grid {h}x{w}; grids must be "
                                 f"even (the collator resizes to multiples of 2 patches)")
            idx = torch.arange(h * w, device=device).reshape(h // 2, 2, w // 2, 2)
            parts.append(idx.permute(0, 2, 1, 3).reshape(-1) + base)
            base += h * w
        return torch.cat(parts)

    def forward(self, feats: PackedFeatures) -> PackedFeatures:
        self._check(feats)
        pre_idx, patch_idx = _prefix_and_patch_index(feats)
        grid = feats.grid_hw
        order = patch_idx[self._merge_order(grid, feats.tokens.device)]
        merged = self.net(self.norm(feats.tokens[order]).reshape(-1, 4 * self.in_dim))
        new_grid = grid // 2
        counts = new_grid.prod(-1).to(feats.tokens.device)
        if self.keep_prefix and feats.num_prefix:
            out = _interleave(self.prefix_proj(feats.tokens[pre_idx]), merged, feats.num_prefix, counts)
            prefix = feats.num_prefix
        else:
            out, prefix = merged, 0
        return PackedFeatures(out, seqlens_to_cu(counts + prefix, device=feats.cu_seqlens.device),
                              new_grid, prefix)


def build_adapter(spec, in_dim: int, out_dim: int) -> Adapter:
    """"mlp2" or {"name": "merge2x2", "keep_prefix": true} -> an adapter module."""
    if isinstance(spec, str):
        spec = {"name": spec}
    kwargs = dict(spec)
    name = kwargs.pop("name")
    adapter = ADAPTERS.get(name)(in_dim, out_dim, **kwargs)
    adapter.name = name
    return adapter
