"""Backend "masked": HF ViT padded to the largest image, with the masked patch
(`mixres.masked_vit_patcher`) giving each image its own positions and attention mask."""

from __future__ import annotations

from torch import nn
from transformers.models.vit.modeling_vit import ViTModel

from mixres.encoders import register_encoder_backend
from mixres.encoders.base import Encoder
from mixres.masked_vit_patcher import _keep_mask, patched
from mixres.packing import PackedFeatures, PackedImages, seqlens_to_cu

__all__ = ["MaskedViTEncoder"]


def _base_vit(model: nn.Module) -> ViTModel:
    if isinstance(model, ViTModel):
        return model
    vit = getattr(model, "vit", None)
    if isinstance(vit, ViTModel):
        return vit
    raise TypeError(f"backend 'masked': expected an HF ViT model (ViTModel or a ViT task model with .vit), "
                    f"got {type(model).__name__}")


@register_encoder_backend("masked")
class MaskedViTEncoder(Encoder):
    """Pad to the largest image, run the patched ViTModel with `image_sizes`, keep valid tokens.

    Works on the ViTModel inside a task model (its pooler output, if any, is `pooled`).
    The patch is applied for the duration of each forward and removed in `finally`, so the
    user's model is unchanged after `encode` (a model the user patched stays patched).

    max_padding  None (default): each chunk is one padded batch, as large as its largest
                 rows x largest cols. A number r >= 1: images are sorted by grid and cut
                 into padded batches whose padded grid holds at most r times their real
                 tokens (plus the first image of each), trading more forwards for less
                 padding. Results are the same either way.

    Pads cost compute: this backend exists for users of the padded API and for comparison;
    backend="packed" does the same work without padding.
    """

    def __init__(self, model: nn.Module, *, max_padding: float | None = None, **kwargs):
        self.vit = _base_vit(model)
        if max_padding is not None and max_padding < 1:
            raise ValueError(f"backend 'masked': max_padding must be None or >= 1, got {max_padding}")
        self.max_padding = max_padding
        super().__init__(model, **kwargs)

    def forward(self, packed: PackedImages) -> PackedFeatures:
        groups = _padding_groups(packed.grid_hw.tolist(), self.max_padding)
        with patched(self.vit):
            return self.run_groups(packed, groups, self._forward_padded)

    def _forward_padded(self, packed: PackedImages) -> PackedFeatures:
        p, c = packed.patch_size, packed.channels
        grid = packed.grid_hw.to(packed.patches.device)
        gh, gw = (int(v) for v in grid.max(0).values.tolist())
        # packed patches are image-major and row-major, the order of the True entries of the
        # padded grid's content mask: one scatter pads every image (no per-image loop)
        keep = _keep_mask(grid, gh, gw)
        cells = packed.patches.new_zeros(grid.shape[0], gh * gw, c * p * p)
        cells[keep[:, 1:]] = packed.patches
        batch = cells.view(-1, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, c, gh * p, gw * p)
        want_hidden = self.select_layer != -1
        out = self.vit(batch, image_sizes=grid * p, output_hidden_states=want_hidden)
        hidden = out.last_hidden_state if not want_hidden else out.hidden_states[self.select_layer]
        return PackedFeatures(hidden[keep], seqlens_to_cu(grid.prod(1) + 1, device=hidden.device),
                              packed.grid_hw, num_prefix=1, pooled=out.pooler_output)


def _padding_groups(grids: list[list[int]], max_padding: float | None) -> list[list[int]]:
    """Indices cut into padded batches whose padded grid holds <= max_padding x real tokens."""
    if max_padding is None or len(grids) < 2:
        return [list(range(len(grids)))]
    order = sorted(range(len(grids)), key=lambda i: (grids[i][0], grids[i][1], i))
    groups, real, rows, cols = [], 0, 0, 0
    for i in order:
        h, w = grids[i]
        r, c = max(rows, h), max(cols, w)
        if groups and (len(groups[-1]) + 1) * r * c <= max_padding * (real + h * w):
            groups[-1].append(i)
            real, rows, cols = real + h * w, r, c
        else:
            groups.append([i])
            real, rows, cols = h * w, h, w
    return groups
