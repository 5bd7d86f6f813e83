"""The types of a family file: `FamilySpec`, its whole-model `Call` and its packed `Recipe`.

A family file (`mixres/families/<name>.py`) builds ONE `FamilySpec` and registers it with
`mixres.families.register_family`; everything mixres knows about the family is a field of
it. Nothing here imports a model library: HF, timm and open_clip families all use it.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mixres.packing import tensor_stamp

__all__ = ["FamilySpec", "Call", "Recipe", "Embedded", "PosCache", "UnknownImageEncoderError",
           "MeanStd", "IMAGENET_DEFAULT", "IMAGENET_STANDARD", "OPENAI_CLIP", "NO_NORMALIZATION",
           "no_prefix", "cls_only", "per_model"]

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]

# normalization constants (HF `image_utils` names)
IMAGENET_DEFAULT: MeanStd = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGENET_STANDARD: MeanStd = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP: MeanStd = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
NO_NORMALIZATION: MeanStd = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


class UnknownImageEncoderError(ValueError):
    """The model does not expose something mixres needs, in any form mixres knows."""


def no_prefix(tower: nn.Module) -> int:
    return 0


def cls_only(tower: nn.Module) -> int:
    return 1


def per_model(fn):
    """Memoize fn(model) per model instance (weak keys: the entry goes with the model).

    Only for pure facts of a built model (its family, widths, patch size): HF configs and
    module trees are not expected to change after construction, so no call changes what
    the next one gets. Errors are not cached.
    """
    cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @functools.wraps(fn)
    def cached(model):
        try:
            return cache[model]
        except (KeyError, TypeError):  # TypeError: not weak-referenceable / hashable
            pass
        value = fn(model)
        try:
            cache[model] = value
        except TypeError:
            pass
        return value

    return cached


# the grouped route: how to call the whole, unmodified model on a batch of one shape

@dataclass(frozen=True)
class Call:
    """How the family is cropped, grouped, called whole and read back (the "grouped" and
    "loop" backends, and the seed API's reference). Callables get the tower's config (the
    tower itself for non-HF models: timm, open_clip).

    crop      crop each image to a multiple of this many pixels first (the patch of patch-
              embedding models, whose stride-p conv drops the rest anyway), or None
    call      (tower, (B, C, H, W), **kw) -> the model's output; None: the model's own forward
              with `families.forward_kwargs` (`families.call_pixels`, filled in by
              `encoders.whole.call_for`, so this file needs nothing from the family table)
    whole_patches  the forward itself refuses a partial patch (crop before the reference)
    call_list (tower, list of (C, H, W), **kw): a batch whose shapes differ but `key` agrees
    key       which images may share a batch (exact shape by default)
    grid      the output token grid of an (H, W) image, for sequence outputs
    stride    input pixels per output token along a side (budgets, resizing)
    min_size  the smallest side the model can encode alone
    """

    crop: Callable[[object], int | None] = lambda cfg: None
    call: Callable | None = None
    whole_patches: bool = False
    call_list: Callable | None = None
    key: Callable[[object, tuple[int, ...]], tuple] = lambda cfg, chw: tuple(chw)
    grid: Callable[[object, int, int], tuple[int, int]] | None = None
    stride: Callable[[object], int | None] = lambda cfg: None
    min_size: Callable[[object], int] = lambda cfg: 1


# the packed route

@dataclass
class Embedded:
    """The packed input of the first layer.

    hidden       (N', D) every image's prefix tokens then its patches
    cu_seqlens   (B+1,) offsets of each image in `hidden`
    layer_kwargs extra kwargs for every layer (e.g. RoPE `position_embeddings`)

    How many prefix tokens each image has is the spec's to say; the packed backend checks
    that `hidden` holds exactly that many per image.
    """

    hidden: torch.Tensor
    cu_seqlens: torch.Tensor
    layer_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """How one family runs packed: embed, which layers, how it finishes and pools.

    embed(tower, packed, cache) -> Embedded   patches as one GEMM, prefix tokens per image,
                                              position codes per grid (cached)
    layers(tower) -> sequence of blocks
    final_norm(tower) -> module | None        what turns the last layer into last_hidden_state
    pool(tower, tokens, cu) -> (B, D') | None the family's pooler output
    run(layers, hidden (1, N, D), cu, layer_kwargs) -> (1, N, D)  how the blocks run on the
        packed sequence; None: HF blocks with the attention swapped through HF's
        AttentionInterface (`mixres.encoders.packed`). Families whose blocks HF cannot reach
        (timm, open_clip) supply their own runner around `mixres.attention.varlen_attention`.
    """

    embed: Callable
    layers: Callable[[nn.Module], Sequence[nn.Module]]
    final_norm: Callable[[nn.Module], nn.Module | None] = lambda tower: None
    pool: Callable = lambda tower, tokens, cu: None
    run: Callable | None = None


class PosCache:
    """LRU of per-grid position codes, keyed by (what, table, grid) and the table's state.

    One per model (`PosCache.of(tower)`, weakly keyed: it goes with the model), so every
    encoder of the same model shares it: `mixres.encode(model, batch)` in a loop makes a new
    encoder per call, and a cache per encoder resampled every grid of every batch again
    (DINOv2-S/14 on 1-16-token images: 6 % of its forward). The table's state
    (`tensor_stamp`) is part of the key, so an optimizer step or a reload invalidates
    entries; nothing is cached while the table needs a gradient.
    """

    _OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, maxsize: int = 512):
        self.maxsize = maxsize
        self._data: OrderedDict = OrderedDict()

    @classmethod
    def of(cls, module: nn.Module) -> PosCache:
        """The cache of `module`'s position codes, shared by every encoder of it."""
        cache = cls._OF.get(module)
        if cache is None:
            cache = cls._OF[module] = cls()
        return cache

    def get(self, table: torch.Tensor, tag: str, grid: tuple[int, int],
            compute: Callable[[], torch.Tensor], stamp: tuple | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and table.requires_grad:
            return compute()
        key = (tag, grid, stamp or tensor_stamp(table))
        hit = self._data.get(key)
        if hit is not None:
            self._data.move_to_end(key)
            return hit
        value = compute()
        self._data[key] = value
        if len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        return value

    def per_grid(self, table: torch.Tensor, tag: str, packed,
                 compute: Callable[[tuple[int, int]], torch.Tensor]) -> torch.Tensor:
        """(N, D) position codes of every packed patch, image after image."""
        grids = [tuple(g) for g in packed.grid_hw.tolist()]
        stamp = tensor_stamp(table)
        return torch.cat([self.get(table, tag, g, lambda g=g: compute(g), stamp) for g in grids])


# the spec

@dataclass(frozen=True)
class FamilySpec:
    """Everything mixres knows about one model family.

    name          the family key (`mixres.families.family` returns it for class matches)
    mean_std      the normalization its checkpoints ship (used when no preprocessor_config.json)
    prefix_tokens tower -> tokens before the patches (CLS, distillation, registers); stated
                  here only, and checked against what the recipe's embed produces
    model_types   HF vision config model_types ("_vision_model" dropped) it answers for;
                  () means (name,)
    classes       qualified class names ("timm.models.vision_transformer.VisionTransformer")
                  that identify a non-HF model; matched along the model's MRO, never imported
    tower         model -> the module that runs the vision backbone; None: HF's wrappers
    patch_tokens  False for CNNs (no pixel patch maps to one output token: patch_size None)
    patch_size, hidden_size  tower -> int; None: read from the HF config
    num_layers    tower -> the layers `select_layer` counts (hidden_states has num_layers + 1
                  entries); None: the config's num_hidden_layers, else len(depths)
    inputs        (tower, (B, C, H, W)) -> forward kwargs, where the forward takes no image
                  (SigLIP2's NaFlex patches, mask and spatial shapes)
    call          how to call it whole (`Call`)
    recipe        its packed recipe, or None
    backend       the backend `encode_images` takes; None: "packed" with a recipe, else "grouped"
    mean_std_of   tower -> (mean, std) where it differs per model (timm's pretrained_cfg,
                  open_clip's preprocess cfg); None: `mean_std`
    """

    name: str
    mean_std: MeanStd
    prefix_tokens: Callable[[nn.Module], int] = no_prefix
    model_types: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    tower: Callable[[nn.Module], nn.Module] | None = None
    patch_tokens: bool = True
    patch_size: Callable[[nn.Module], int | None] | None = None
    hidden_size: Callable[[nn.Module], int] | None = None
    num_layers: Callable[[nn.Module], int] | None = None
    inputs: Callable[[nn.Module, torch.Tensor], dict] | None = None
    call: Call = Call()
    recipe: Recipe | None = None
    backend: str | None = None
    mean_std_of: Callable[[nn.Module], MeanStd] | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        return self.model_types or (self.name,)

    @property
    def route(self) -> str:
        """The backend of `encode_images`: the family's fastest exact one."""
        return self.backend or ("packed" if self.recipe is not None else "grouped")

    def matches_class(self, model: object) -> bool:
        names = {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}
        return bool(names & set(self.classes))
