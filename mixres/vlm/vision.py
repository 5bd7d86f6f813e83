"""Vision towers of the VLM: every mixres encoder backend, and a `random` stub for tests.

A tower is an nn.Module with
    forward(PackedImages) -> PackedFeatures      packed in, packed out, never padded
    patch_size, mean_std, num_prefix, hidden_size  what preprocessing and the adapter need
so the collator can count each image's tokens before anything runs.

Specs (`build_tower`): a registered name ("random", or a mixres backend "packed", "loop",
...) with keyword arguments, or anything else -> the "packed" backend on that model
(preset name, local path, hub id or nn.Module).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mixres.packing import PackedFeatures, PackedImages
from mixres.vlm.interfaces import Tower, missing_members
from mixres.vlm.registry import TOWERS, register_tower

__all__ = ["RandomTower", "EncoderTower", "build_tower", "scratch_vit"]


@register_tower("random")
class RandomTower(nn.Module):
    """A deterministic stand-in for a ViT: each patch becomes one token, grid-many per image.

    token = sin(patch @ W + position code of its (row, col)) with W drawn from `seed`, so
    the same image gives the same tokens in every process, different images give
    different tokens, and W is a parameter (freeze specs and gradients can be tested).
    `num_prefix` learned prefix tokens (CLS-like) are put first, as HF ViTs do.
    """

    def __init__(self, hidden: int = 32, patch_size: int = 8, num_prefix: int = 0, seed: int = 0,
                 channels: int = 3, mean: float = 0.5, std: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = channels * patch_size ** 2
        self.proj = nn.Parameter(torch.randn(dim, hidden, generator=g) / math.sqrt(dim))
        self.prefix = nn.Parameter(torch.randn(num_prefix, hidden, generator=g))
        self.patch_size, self.num_prefix, self.hidden_size = patch_size, num_prefix, hidden
        self.mean_std = ((mean,) * channels, (std,) * channels)
        self.blocks = ()  # no transformer blocks: nothing for checkpointing or FSDP to wrap

    def _positions(self, grid_hw: torch.Tensor) -> torch.Tensor:
        rows = [torch.arange(h).repeat_interleave(w) for h, w in grid_hw.tolist()]
        cols = [torch.arange(w).repeat(h) for h, w in grid_hw.tolist()]
        r, c = torch.cat(rows).float(), torch.cat(cols).float()
        freq = torch.arange(1, self.hidden_size + 1) / self.hidden_size
        return torch.sin(r[:, None] * freq) + torch.cos(c[:, None] * freq * 1.7)

    def forward(self, packed: PackedImages) -> PackedFeatures:
        x = torch.sin(packed.patches.to(self.proj.dtype) @ self.proj
                      + self._positions(packed.grid_hw).to(self.proj))
        if self.num_prefix:
            parts = torch.split(x, packed.seqlens.tolist())
            x = torch.cat([t for p in parts for t in (self.prefix, p)])
        lens = packed.seqlens + self.num_prefix
        return PackedFeatures(x, torch.nn.functional.pad(lens.cumsum(0).int(), (1, 0)),
                              packed.grid_hw, self.num_prefix)


class EncoderTower(nn.Module):
    """A mixres encoder backend as a module: `.model` is the HF model (what freeze specs
    like "encoder.model.encoder.layer.1" name); the backend object runs it packed."""

    def __init__(self, model, backend: str = "packed", **kwargs):
        super().__init__()
        from mixres.encoders import load_encoder

        runner = load_encoder(model, backend=backend, **kwargs)
        self.model = runner.model
        # a plain attribute, not a submodule: it only holds a reference to self.model
        self.__dict__["runner"] = runner
        self.backend = backend

    @property
    def patch_size(self) -> int:
        return self.runner.patch_size

    @property
    def mean_std(self):
        return self.runner.mean_std

    @property
    def num_prefix(self) -> int:
        return self.runner.num_prefix

    @property
    def hidden_size(self) -> int:
        return self.runner.facts.hidden_size

    @property
    def blocks(self) -> list[nn.Module]:
        """The tower is one block: its layers run inside the backend's packed context
        (varlen attention implementation, segment offsets), which a layer recomputed alone
        in backward (activation checkpointing) would not see; the whole tower recomputes
        inside it."""
        return [self]

    def forward(self, packed: PackedImages) -> PackedFeatures:
        # the trainable-encoder path asks for gradients explicitly: an encoder runs without
        # them by default, and a VLM may train a layer of a tower that is in eval mode
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        return self.runner.encode(packed, grad=grad)


def _backend_builder(backend: str):
    def build(model, **kwargs) -> EncoderTower:
        return EncoderTower(model, backend=backend, **kwargs)
    build.__doc__ = f"The mixres {backend!r} encoder backend on `model`."
    return build


def _register_backends() -> None:
    from mixres.encoders import list_backends

    for name in list_backends():
        if name not in TOWERS:
            register_tower(name)(_backend_builder(name))


_register_backends()


@register_tower("vit")
def scratch_vit(hidden: int = 64, layers: int = 2, heads: int = 4, mlp_ratio: float = 2.0,
                patch_size: int = 8, image_size: int = 64, sincos: float = 0.0,
                backend: str = "packed", **kwargs) -> EncoderTower:
    """An HF ViT built from its shape with random weights (to train from scratch), run by a
    mixres backend; {"name": "vit", "hidden": 64, "layers": 2, "patch_size": 8}. Its learned
    position table (image_size / patch_size per side) is interpolated to each image's grid.

    sincos > 0 starts that table at `sincos` times a 2-D sine-cosine code (MAE) instead of
    HF's near-zero noise, so where a patch lies is visible from the first step."""
    import transformers as tf

    cfg = tf.ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=int(hidden * mlp_ratio), patch_size=patch_size,
                       image_size=image_size)
    model = tf.ViTModel(cfg, add_pooling_layer=False)
    if sincos:
        with torch.no_grad():
            side = image_size // patch_size
            model.embeddings.position_embeddings[0, 1:] = sincos * _sincos_2d(side, hidden)
    return EncoderTower(model, backend=backend, **kwargs)


def _sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) MAE 2-D sine-cosine position code: half the channels for the row."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    grid = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angle = coord[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    code = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(code, (0, dim - code.shape[1]))


def build_tower(spec) -> nn.Module:
    """A tower from a spec: "random", {"name": "random", "hidden": 48}, {"name": "packed",
    "model": "tiny-vit", "select_layer": -2}, "tiny-vit", a path, or an nn.Module."""
    if isinstance(spec, nn.Module):
        missing = missing_members(spec, Tower)
        if not missing:
            return spec  # already a tower
        if missing == ["blocks"]:
            raise TypeError(f"tower {type(spec).__name__} lacks `blocks`: its blocks, which checkpointing, "
                            f"compile and FSDP2 wrap (mixres.vlm.interfaces.Tower; () for none)")
        return EncoderTower(spec)
    if isinstance(spec, str):
        spec = {"name": spec} if spec in TOWERS else {"name": "packed", "model": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"encoder spec: expected a name, a model or a dict with 'name', got {spec!r}")
    kwargs = dict(spec)
    return TOWERS.get(kwargs.pop("name"))(**kwargs)
