"""The layout facts every VLM part agrees on, stated once.

    TEXT, IMAGE      modality ids of LM positions
    IGNORE           the label of a position that is not trained on
    IMAGE_TOKEN      the placeholder that marks where one image's tokens go ("<image>")
    target_mask      which positions are targets: a trained label that is not the first
                     position of its sample (position t is predicted from t-1 of the same
                     sample, never across samples)
    ImageLayout      plain values the collator needs to size and normalise an image and to
                     count the LM tokens it brings: no modules, so a DataLoader worker
                     pickles a few numbers, not the encoder
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TEXT", "IMAGE", "IGNORE", "IMAGE_TOKEN", "target_mask", "ImageLayout"]

TEXT, IMAGE = 0, 1
IGNORE = -100
IMAGE_TOKEN = "<image>"


def target_mask(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the positions whose label is trained on (see the module docstring)."""
    return (labels != IGNORE) & (position_ids > 0)


@dataclass(frozen=True)
class ImageLayout:
    """How an image becomes LM tokens, in plain values.

    patch_size      encoder patch side in pixels
    grid_multiple   every grid side is resized to a multiple of this (2 for merge2x2)
    merge           the adapter turns each merge x merge block of patches into one token
    prefix_tokens   LM tokens from the encoder's prefix (CLS, registers) per image
    mean, std       per-channel normalisation of the encoder
    min_image_tokens, max_image_tokens   resize bounds, in encoder patches
    """

    patch_size: int
    grid_multiple: int = 1
    merge: int = 1
    prefix_tokens: int = 0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    min_image_tokens: int = 1
    max_image_tokens: int | None = 1024

    @property
    def unit(self) -> int:
        """The resize unit in pixels: every side is a multiple of it."""
        return self.patch_size * self.grid_multiple

    def unit_bounds(self) -> tuple[int, int | None]:
        """The token bounds in units of grid_multiple x grid_multiple patches."""
        m2 = self.grid_multiple ** 2
        lo = max(1, -(-self.min_image_tokens // m2))
        hi = None if self.max_image_tokens is None else max(1, self.max_image_tokens // m2)
        return lo, hi

    def tokens(self, grid_hw) -> int:
        """LM tokens of an image whose patch grid is grid_hw = (rows, cols)."""
        h, w = int(grid_hw[0]), int(grid_hw[1])
        return (h // self.merge) * (w // self.merge) + self.prefix_tokens

    def tokens_for_size(self, height: int, width: int) -> int:
        """LM tokens of an image of height x width pixels once resized (nothing decoded)."""
        from mixres.images import target_size

        lo, hi = self.unit_bounds()
        H, W = target_size(height, width, self.unit, min_image_tokens=lo, max_image_tokens=hi)
        return self.tokens((H // self.patch_size, W // self.patch_size))
