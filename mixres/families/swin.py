"""Swin v1/v2: windowed attention, tokens merged 2x2 at every stage, no prefix; no packed
recipe (windows are not per-image sequences), so it runs whole (the grouped route).

One output token covers patch_size * 2**(len(depths) - 1) pixels per side; the patch
embedding pads to a whole patch and each merge pads to even, so images keep their size.
"""

from __future__ import annotations

import math

from mixres.families import Call, FamilySpec, register_family
from mixres.families.common import cfg_patch
from mixres.families.spec import IMAGENET_DEFAULT


def _grid(cfg, H: int, W: int) -> tuple[int, int]:
    p = cfg_patch(cfg)
    h, w = math.ceil(H / p), math.ceil(W / p)
    for _ in range(len(cfg.depths) - 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


SPEC = register_family(FamilySpec(
    "swin", IMAGENET_DEFAULT, model_types=("swin", "swinv2"),
    call=Call(grid=_grid, stride=lambda cfg: cfg_patch(cfg) * 2 ** (len(cfg.depths) - 1))))
