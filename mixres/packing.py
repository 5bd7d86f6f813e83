"""Ragged data types that flow through mixres, and the token-budget scheduler.

Images of different sizes are never padded: their patches (or tokens) are
concatenated along one axis and a `cu_seqlens` offset vector (the Qwen2-VL /
flash-attention convention) says where each image starts and ends.

    PackedImages    patches (N, C*p*p), grid_hw (B, 2), cu_seqlens (B+1,)
    PackedFeatures  tokens (N', D),     grid_hw (B, 2), cu_seqlens (B+1,), num_prefix, pooled

`pack_into_bins` is the first-fit-decreasing scheduler that the encoders, the
extraction pipeline and the VLM collator all use to cut work into token budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["PackedImages", "PackedFeatures", "pack_into_bins", "seqlens_to_cu", "patchify",
           "POOLERS", "pool_features", "check_pool", "default_pool", "segment_ids", "local_positions",
           "interleave_prefix", "resample_table", "tensor_stamp", "unpatchify"]


# helpers

def seqlens_to_cu(lengths: Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
    """Lengths (B,) -> int32 offsets (B+1,) starting at 0."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device).reshape(-1)
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(N,) long: which image each packed token belongs to."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lens.numel(), device=cu_seqlens.device), lens)


def local_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(N,) long: each packed token's index within its own image."""
    n = int(cu_seqlens[-1])
    return torch.arange(n, device=cu_seqlens.device) - cu_seqlens[:-1].long()[segment_ids(cu_seqlens)]


def interleave_prefix(prefix: torch.Tensor, tokens: torch.Tensor,
                      cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, D) prefix + (N, D) packed tokens -> (N + B*P, D) with each image's prefix first,
    and the new offsets.

    One gather from cat([prefix, tokens]) so autograd sees a single differentiable op.
    """
    p = prefix.shape[0]
    if p == 0:
        return tokens, cu_seqlens
    dev = tokens.device
    cu = seqlens_to_cu((cu_seqlens[1:] - cu_seqlens[:-1]).to(dev).long() + p, device=dev)
    image, local = segment_ids(cu), local_positions(cu)
    t = torch.arange(int(cu[-1]), device=dev)
    idx = torch.where(local < p, local, t + p - p * (image + 1))  # token j sits at P + j
    return torch.cat([prefix.to(tokens.dtype), tokens]).index_select(0, idx), cu


def resample_table(table: torch.Tensor, grid: tuple[int, int], *, mode: str = "bicubic",
                   fp32: bool = False, antialias: bool = False, keep_native: bool = True) -> torch.Tensor:
    """(n, D) square table of learned patch position codes -> (h*w, D) for `grid`, as the
    families' own interpolation does it (HF's `interpolate_pos_encoding`, SigLIP2's resize).

    keep_native: return the table unchanged for the native square grid (HF's shortcut);
    fp32: interpolate in float32 and cast back (DINOv2; SigLIP2 on the CPU).
    """
    n, dim = table.shape
    s = int(math.isqrt(n))
    h, w = grid
    if keep_native and h == w and h * w == n:
        return table
    kw = {"antialias": True} if antialias else {}
    in_fp32 = fp32 or table.dtype == torch.float32
    if mode in ("bicubic", "bilinear") and not antialias and (in_fp32 or table.device.type == "cuda"):
        # Separable: the same resize is a (h, s) matrix down the rows and a (w, s) matrix
        # across the columns, each read off F.interpolate of an identity basis, so the
        # coefficients (clamped borders) are the library's own. Two small GEMMs in float32,
        # rounded once to the table's dtype: what the float32 kernel gives (to ~1e-7) and
        # what the CUDA kernel gives below float32 (it accumulates in float32 and rounds
        # once), where it took ~2 ms per grid for a 768-wide table; this takes microseconds.
        # The CPU's bf16 kernel rounds between its passes: that stays the library's own.
        rows, cols = (_axis_matrix(s, n_out, mode, kw, table.device) for n_out in (h, w))
        x = torch.einsum("ia,abd,jb->ijd", rows, table.reshape(s, s, dim).float(), cols)
        return x.to(table.dtype).reshape(h * w, dim)
    x = table.reshape(1, s, s, dim).permute(0, 3, 1, 2)
    x = F.interpolate(x.float() if fp32 else x, size=(h, w), mode=mode, align_corners=False, **kw)
    return x.to(table.dtype).permute(0, 2, 3, 1).reshape(h * w, dim)


def _axis_matrix(n_in: int, n_out: int, mode: str, kw: dict, device) -> torch.Tensor:
    """(n_out, n_in) float32: the 1-D resize `F.interpolate` applies along one axis (the
    other axis has size 1, which every mode maps to itself)."""
    basis = torch.eye(n_in, device=device).reshape(n_in, 1, n_in, 1)
    out = F.interpolate(basis, size=(n_out, 1), mode=mode, align_corners=False, **kw)
    return out[:, 0, :, 0].T


def tensor_stamp(t: torch.Tensor) -> tuple:
    """What a cache derived from `t` must be keyed on to notice that `t` changed.

    A normal tensor's in-place version counter says it; an inference tensor (a weight made
    or loaded under `torch.inference_mode`, e.g. by a timm model run there) has no version
    counter, so its contents stand in: two sums in float64, one host sync, far cheaper than
    the codes the key guards.
    """
    # the base tensor's identity, not the view's: a recipe reads its table through a fresh
    # view every forward (`position_embeddings[0]`), whose id is new unless CPython happens
    # to reuse the address, and a miss recomputes every grid (bicubic on CUDA: ~2 ms each)
    base = t._base if t._base is not None else t
    head = (id(base), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device,
            torch.is_inference_mode_enabled())
    if not t.is_inference():
        return (*head, t._version)
    with torch.no_grad():
        d = t.detach().double()
        return (*head, *torch.stack([d.sum(), (d * d).sum()]).tolist())


def _check_cu(cu_seqlens: torch.Tensor, total: int, what: str) -> None:
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{what}: cu_seqlens must be 1-D with B+1 entries, got {tuple(cu_seqlens.shape)}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"{what}: cu_seqlens must start at 0 and end at {total}, "
                         f"got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"{what}: cu_seqlens must be non-decreasing")


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, H, W) -> (h*w, C*p*p): patches row-major, each flattened channel-major (c, ph, pw).

    This is the layout of a Conv2d patch embedding's weight, so the projection of all
    packed patches is one GEMM with `conv.weight.flatten(1)`.
    """
    c, H, W = image.shape
    p = patch_size
    h, w = H // p, W // p
    x = image.reshape(c, h, p, w, p).permute(1, 3, 0, 2, 4)  # h w c ph pw
    return x.reshape(h * w, c * p * p)


def unpatchify(patches: torch.Tensor, grid_hw: Sequence[int], patch_size: int,
               channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (h*w, C*p*p) -> (C, h*p, w*p)."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    p = patch_size
    x = patches.reshape(h, w, channels, p, p).permute(2, 0, 3, 1, 4)  # c h ph w pw
    return x.reshape(channels, h * p, w * p)


class _Segments:
    """What both ragged types derive from their `cu_seqlens` offsets."""

    cu_seqlens: torch.Tensor

    @property
    def num_images(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def seqlens(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def max_seqlen(self) -> int:
        return int(self.seqlens.max()) if self.num_images else 0


# images

@dataclass
class PackedImages(_Segments):
    """All images of a batch as one ragged sequence of flattened patches.

    patches    (N, C*p*p)  each patch channel-major (c, ph, pw), patches row-major per image
    grid_hw    (B, 2) long patch grid (rows, cols) of each image
    cu_seqlens (B+1,) int32 offsets of each image's patches in `patches`
    """

    patches: torch.Tensor
    grid_hw: torch.Tensor
    cu_seqlens: torch.Tensor
    patch_size: int
    channels: int = 3

    def __post_init__(self):
        if self.patches.ndim != 2:
            raise ValueError(f"PackedImages.patches must be (N, C*p*p), got {tuple(self.patches.shape)}")
        expect = self.channels * self.patch_size ** 2
        if self.patches.shape[1] != expect:
            raise ValueError(f"PackedImages.patches has {self.patches.shape[1]} values per patch, "
                             f"expected channels*p*p = {expect}")
        if self.grid_hw.ndim != 2 or self.grid_hw.shape[1] != 2:
            raise ValueError(f"PackedImages.grid_hw must be (B, 2), got {tuple(self.grid_hw.shape)}")
        _check_cu(self.cu_seqlens, self.patches.shape[0], "PackedImages")
        if self.cu_seqlens.numel() != self.grid_hw.shape[0] + 1:
            raise ValueError(f"PackedImages: {self.grid_hw.shape[0]} grids but "
                             f"{self.cu_seqlens.numel() - 1} segments in cu_seqlens")

    @classmethod
    def from_images(cls, images: Sequence[torch.Tensor], patch_size: int) -> PackedImages:
        """Pack a list of (C, H, W) float tensors whose H, W are multiples of `patch_size`."""
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = [images]
        if len(images) == 0:
            raise ValueError("PackedImages.from_images: got an empty list of images")
        if not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"PackedImages.from_images: patch_size must be a positive int, "
                             f"got {patch_size!r}")
        channels = None
        patches, grids = [], []
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor):
                raise TypeError(f"image {i}: expected a (C, H, W) tensor, got {type(img).__name__}")
            if img.ndim != 3:
                raise ValueError(f"image {i}: expected (C, H, W), got shape {tuple(img.shape)}")
            c, H, W = img.shape
            if channels is None:
                channels = c
            if c != channels:
                raise ValueError(f"image {i}: has {c} channels, the first image has {channels}")
            if H == 0 or W == 0 or H % patch_size or W % patch_size:
                raise ValueError(f"image {i}: size {H}x{W} is not a positive multiple of the "
                                 f"patch size {patch_size}")
            if not img.is_floating_point():
                raise TypeError(f"image {i}: expected a float tensor, got {img.dtype}")
            patches.append(patchify(img, patch_size))
            grids.append((H // patch_size, W // patch_size))
        grid_hw = torch.tensor(grids, dtype=torch.long)
        device = patches[0].device
        flat = torch.cat(patches)
        # one reduction over the packed patches (a check per image costs a sync each)
        if not bool(torch.isfinite(flat).all()):
            bad = next(i for i, p in enumerate(patches) if not bool(torch.isfinite(p).all()))
            raise ValueError(f"image {bad}: contains NaN or inf values")
        return cls(flat, grid_hw.to(device),
                   seqlens_to_cu(grid_hw.prod(-1), device=device), patch_size, channels)

    def to(self, device=None, dtype=None) -> PackedImages:
        return PackedImages(self.patches.to(device=device, dtype=dtype),
                            self.grid_hw.to(device), self.cu_seqlens.to(device),
                            self.patch_size, self.channels)

    def unpack(self) -> list[torch.Tensor]:
        """The images back as a list of (C, H, W) tensors (for backends that need pixels)."""
        cu = self.cu_seqlens.tolist()
        return [unpatchify(self.patches[cu[i]:cu[i + 1]], self.grid_hw[i].tolist(),
                           self.patch_size, self.channels) for i in range(self.num_images)]

    def select(self, indices: Sequence[int]) -> PackedImages:
        indices = list(indices)
        cu = self.cu_seqlens.tolist()
        parts = [self.patches[cu[i]:cu[i + 1]] for i in indices]
        grid = self.grid_hw[indices]
        return PackedImages(torch.cat(parts) if parts else self.patches[:0], grid,
                            seqlens_to_cu(grid.prod(-1), device=self.patches.device),
                            self.patch_size, self.channels)


# features

@dataclass
class PackedFeatures(_Segments):
    """Every image's output tokens as one ragged sequence.

    tokens     (N, D)  each image's prefix tokens (CLS, registers) first, then its patch
               tokens row-major
    cu_seqlens (B+1,) int32 offsets of each image in `tokens`
    grid_hw    (B, 2) patch grid of each image (the grid the tokens were computed on)
    num_prefix prefix tokens per image (0 for SigLIP, 1 for ViT/CLIP, 1+R for DINOv2-reg)
    pooled     (B, D') the model's own pooled output, or None
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    grid_hw: torch.Tensor
    num_prefix: int = 0
    pooled: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens.ndim != 2:
            raise ValueError(f"PackedFeatures.tokens must be (N, D), got {tuple(self.tokens.shape)}")
        _check_cu(self.cu_seqlens, self.tokens.shape[0], "PackedFeatures")
        b = self.cu_seqlens.numel() - 1
        if tuple(self.grid_hw.shape) != (b, 2):
            raise ValueError(f"PackedFeatures.grid_hw must be ({b}, 2), got {tuple(self.grid_hw.shape)}")
        if self.pooled is not None and self.pooled.shape[0] != b:
            raise ValueError(f"PackedFeatures.pooled has {self.pooled.shape[0]} rows for {b} images")

    def unpack(self) -> list[torch.Tensor]:
        """A list of (n_i, D) tensors, one per image (views, no copy)."""
        return list(torch.split(self.tokens, self.seqlens.tolist()))

    def patch_tokens(self) -> list[torch.Tensor]:
        """Each image's patch tokens (prefix dropped) as (h, w, D) grids."""
        return [t[self.num_prefix:].reshape(int(g[0]), int(g[1]), -1)
                for t, g in zip(self.unpack(), self.grid_hw.tolist())]

    def to_padded(self, pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Lmax, D) padded tokens and a (B, Lmax) bool mask, True on real tokens.

        Only for users who ask for a dense layout; nothing inside mixres needs it.
        """
        lens = self.seqlens.to(self.tokens.device)
        b, lmax = self.num_images, self.max_seqlen
        out = self.tokens.new_full((b, lmax, self.tokens.shape[1]), pad_value)
        mask = torch.arange(lmax, device=self.tokens.device)[None] < lens[:, None]
        out[mask] = self.tokens
        return out, mask

    def select(self, indices: Sequence[int]) -> PackedFeatures:
        indices = list(indices)
        parts = self.unpack()
        chosen = [parts[i] for i in indices]
        grid = self.grid_hw[indices]
        tokens = torch.cat(chosen) if chosen else self.tokens[:0]
        pooled = self.pooled[indices] if self.pooled is not None else None
        lens = [p.shape[0] for p in chosen]
        return PackedFeatures(tokens, seqlens_to_cu(lens, device=self.cu_seqlens.device), grid,
                              self.num_prefix, pooled)

    def to(self, device=None, dtype=None) -> PackedFeatures:
        pooled = self.pooled.to(device=device, dtype=dtype) if self.pooled is not None else None
        return PackedFeatures(self.tokens.to(device=device, dtype=dtype),
                              self.cu_seqlens.to(device), self.grid_hw.to(device),
                              self.num_prefix, pooled)

    @staticmethod
    def cat(parts: Sequence[PackedFeatures]) -> PackedFeatures:
        """Concatenate along the image axis (e.g. the chunks of a token-budget run)."""
        parts = list(parts)
        if not parts:
            raise ValueError("PackedFeatures.cat: got an empty list")
        prefixes = {p.num_prefix for p in parts}
        if len(prefixes) != 1:
            raise ValueError(f"PackedFeatures.cat: parts disagree on num_prefix: {sorted(prefixes)}")
        has_pooled = {p.pooled is not None for p in parts}
        if len(has_pooled) != 1:
            raise ValueError("PackedFeatures.cat: some parts have pooled outputs and some do not")
        lens = torch.cat([p.seqlens.cpu() for p in parts])
        pooled = torch.cat([p.pooled for p in parts]) if parts[0].pooled is not None else None
        return PackedFeatures(torch.cat([p.tokens for p in parts]),
                              seqlens_to_cu(lens, device=parts[0].cu_seqlens.device),
                              torch.cat([p.grid_hw.to(device=parts[0].grid_hw.device) for p in parts]),
                              parts[0].num_prefix, pooled)


# scheduling

def pack_into_bins(lengths: Sequence[int], budget: int | None) -> list[list[int]]:
    """First-fit-decreasing bin packing of items into token budgets.

    Returns lists of indices into `lengths`; every index appears exactly once. An item
    longer than the budget gets a bin of its own (it cannot be split). Ties are broken
    by index so the result is deterministic. `budget=None` puts everything in one bin.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError("pack_into_bins: lengths must be non-negative")
    if not lengths:
        return []
    if budget is None:
        return [list(range(len(lengths)))]
    if budget <= 0:
        raise ValueError(f"pack_into_bins: budget (tokens per bin) must be positive, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(budget - n)
    return bins


# pooling: one pooled vector per image (a table: name -> how it is made)

def _pool_model(f: PackedFeatures) -> torch.Tensor:
    if f.pooled is None:
        raise ValueError("pool='model': this model/backend gives no pooled output; "
                         "use pool='cls' (if it has a CLS token) or 'mean'")
    return f.pooled


def _pool_cls(f: PackedFeatures) -> torch.Tensor:
    if f.num_prefix < 1:
        raise ValueError("pool='cls': the model has no CLS token (num_prefix=0, e.g. SigLIP); "
                         "use pool='model' or 'mean'")
    return f.tokens[f.cu_seqlens[:-1].long()]


def mean_pool(tokens: torch.Tensor, cu_seqlens: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """(B, D): the mean of each image's tokens after its first `skip` (the one "mean" of mixres).

    `pool="mean"` skips the prefix tokens: CLS and registers are not part of the image's
    area. The seed toolkit's `encode_images` keeps them (skip 0): its embedding of a model
    without a pooler is `vision_utils.pool_hidden_dim` of last_hidden_state, the mean over
    every position.
    """
    cu = cu_seqlens.tolist()
    return torch.stack([tokens[a + skip:b].mean(0) for a, b in zip(cu[:-1], cu[1:])])


def _pool_mean(f: PackedFeatures) -> torch.Tensor:
    return mean_pool(f.tokens, f.cu_seqlens, f.num_prefix)


POOLERS = {"model": _pool_model, "cls": _pool_cls, "mean": _pool_mean, "none": None}


def pool_features(feats: PackedFeatures, how: str) -> PackedFeatures:
    """`feats` with `pooled` replaced as asked: model | cls | mean | none (pooled=None)."""
    if how not in POOLERS:
        raise ValueError(f"pool={how!r}: choose one of {sorted(POOLERS)}")
    fn = POOLERS[how]
    if fn is not None and feats.num_images == 0:  # no images: no rows, whatever the pooling
        return replace(feats, pooled=feats.tokens.new_zeros(0, feats.tokens.shape[1]))
    return replace(feats, pooled=None if fn is None else fn(feats))


def default_pool(select_layer: int, num_prefix: int) -> str:
    """What pool=None means: the model's own pooler on the last layer (select_layer=-1; the
    pooler reads the last layer), else the CLS token where the model has one (num_prefix >= 1),
    else the mean of the patch tokens."""
    if select_layer == -1:
        return "model"
    return "cls" if num_prefix >= 1 else "mean"


def check_pool(pool: str | None, select_layer: int, num_prefix: int | None = None) -> str | None:
    """`pool` checked against select_layer; None resolves to `default_pool` once num_prefix is known
    (None stays None before that)."""
    if pool is None:
        return None if num_prefix is None else default_pool(select_layer, num_prefix)
    if pool not in POOLERS:
        raise ValueError(f"pool={pool!r}: choose one of {sorted(POOLERS)}")
    if pool == "model" and select_layer != -1:
        raise ValueError(f"pool='model' needs select_layer=-1 (the model's pooler reads the last layer), "
                         f"got select_layer={select_layer}; use pool 'cls', 'mean' or 'none', or leave "
                         f"pool unset (the default follows the layer)")
    return pool
