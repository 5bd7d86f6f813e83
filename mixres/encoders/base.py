"""What every encoder backend shares: preprocessing, token-budget chunking, ordering, autograd.

A backend implements `forward(packed: PackedImages) -> PackedFeatures` for one chunk;
`encode` turns user inputs into PackedImages through the encoder's `Preprocessor`, cuts
them into `max_batch_tokens` bins with `pack_into_bins` (halving the budget when the device
runs out of memory), runs the chunks and puts the images back in input order, so results
never depend on the chunking or on the order of the images.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import cached_property

import torch
from torch import nn

from mixres.attention import plans_segments
from mixres.families.facts import ModelFacts, model_facts
from mixres.packing import PackedFeatures, PackedImages, pack_into_bins
from mixres.prepacked import prepacked_linears
from mixres.preprocess import DEFAULT_MAX_IMAGE_TOKENS, Preprocessor
from mixres.renamed import IMAGE_TOKENS, resolve_renamed

__all__ = ["Encoder", "resolve_layer", "DEFAULT_MAX_IMAGE_TOKENS"]


def resolve_layer(select_layer: int, num_layers: int) -> int:
    """Index into HF's hidden_states (0 = embeddings, num_layers = last layer, pre-norm)."""
    idx = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 0 <= idx <= num_layers:
        raise ValueError(f"select_layer={select_layer} is out of range for a model with {num_layers} "
                         f"layers (hidden_states has {num_layers + 1} entries: 0..{num_layers} or "
                         f"-1..-{num_layers + 1})")
    return idx


class Encoder:
    """Base class of the backends (see `mixres.encoders.load_encoder`).

    model             the HF (or vit-pytorch) model, used as it is
    select_layer      -1: the last layer's output with the final norm; -k: HF's
                      `hidden_states[-k]` (no final norm), the LLaVA convention for -2
    max_batch_tokens  token budget of one forward; None runs everything at once; "auto"
                      (the default) is None on accelerators and `cpu_chunk_tokens` on the
                      CPU for backends that set it: one 14k-token GEMM falls out of the CPU
                      caches and runs slower than 2k-token chunks (benchmarks/README.md).
                      A chunk that runs out of device memory halves the budget (kept for
                      later calls, with a warning) and runs again.
    dtype, device     move the model there first (explicitly asked for by the caller)
    decode, min_image_tokens, max_image_tokens  the `Preprocessor` of everything that is not
                      a ready tensor (paths, bytes, PIL images, arrays, pixel tensors)

    `facts` is the model's `ModelFacts`; `preprocessor` its `Preprocessor` (built on first use).
    """

    backend = "base"
    prepack = True  # CPU inference through `mixres.prepacked` (the loop reference: False)
    cpu_chunk_tokens: int | None = None  # budget of max_batch_tokens="auto" on the CPU

    def __init__(self, model: nn.Module, *, select_layer: int = -1,
                 max_batch_tokens: int | str | None = "auto", dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, min_image_tokens: int = 1,
                 max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS, decode: str = "pil", **renamed):
        from mixres.decode import get_decoder

        min_image_tokens, max_image_tokens = resolve_renamed(
            renamed, IMAGE_TOKENS, type(self).__name__, min_image_tokens=min_image_tokens,
            max_image_tokens=max_image_tokens)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: expected an nn.Module, got {type(model).__name__}")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        self._auto_chunks = max_batch_tokens == "auto"
        if self._auto_chunks:
            max_batch_tokens = None
        if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens <= 0):
            raise ValueError(f"max_batch_tokens must be a positive int, None or 'auto', "
                             f"got {max_batch_tokens!r}")
        get_decoder(decode)  # an unknown decoder, or cuda without a GPU: one line, at load
        self.model = model
        self.facts: ModelFacts = model_facts(model)
        self.select_layer = select_layer
        self.max_batch_tokens = max_batch_tokens
        self.min_image_tokens, self.max_image_tokens = min_image_tokens, max_image_tokens
        self.decode = decode
        self._check_select_layer()

    def _check_select_layer(self) -> None:
        """A select_layer past the model's layers fails here, at load, not at the first encode."""
        from mixres import families

        if isinstance(self.select_layer, bool) or not isinstance(self.select_layer, int):
            raise TypeError(f"select_layer must be an int, got {self.select_layer!r}")
        try:
            layers = self.facts.num_layers
        except families.UnknownImageEncoderError:  # a family mixres has no file for
            return
        try:
            resolve_layer(self.select_layer, layers)
        except ValueError as e:
            raise ValueError(f"backend {self.backend!r}, {type(self.model).__name__}: {e}") from None

    # what the model expects, from its facts

    @property
    def patch_size(self) -> int:
        return self.facts.patch_size

    @property
    def grid_unit(self) -> int:
        """Pixels per output token along a side: PIL/path inputs are resized to multiples of it."""
        return self.patch_size

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.facts.mean_std

    @property
    def num_prefix(self) -> int:
        return self.facts.num_prefix

    max_grid: tuple[int, int] | None = None  # the largest grid the model takes (NaViT's tables)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    # inputs

    @cached_property
    def preprocessor(self) -> Preprocessor:
        # ready tensors are checked where they are packed (or cropped, by grouped and loop)
        return Preprocessor(self, decode=self.decode, min_image_tokens=self.min_image_tokens,
                            max_image_tokens=self.max_image_tokens, unit=self.grid_unit,
                            max_grid=self.max_grid, check_ready=False)

    def prepare(self, images) -> list[torch.Tensor]:
        """User inputs -> list of normalized (C, H, W) tensors (`Preprocessor`)."""
        if not _is_list(images):
            images = [images]
        if self._all_ready(images):
            return list(images)  # used as given; no preprocessor needed (CNNs have no resize unit)
        return self.preprocessor.many(images)

    def _all_ready(self, images) -> bool:
        """Only float (C, H, W) tensors with the model's channels: normalized already."""
        from mixres.families import UnknownImageEncoderError

        try:
            channels = len(self.mean_std[0])
        except UnknownImageEncoderError:  # a family mixres has no file for
            channels = None
        return all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim == 3
                   and channels in (None, t.shape[0]) for t in images)

    def pack(self, images) -> PackedImages:
        if isinstance(images, PackedImages):
            return images
        return PackedImages.from_images(self.prepare(images), self.patch_size)

    # execution

    def encode(self, images: Sequence | PackedImages, *, grad: bool | None = None) -> PackedFeatures:
        """Encode images (anything the `Preprocessor` takes, a list of them, or PackedImages).

        grad  track gradients: None (the default) does when the model is in training mode and
              autograd is on; True / False force it. Without gradients the call runs under
              inference mode, or under no_grad when the caller's autograd is on (then the
              features may still feed a trainable module, which inference tensors cannot).
        An empty list gives empty features.
        """
        if not isinstance(images, PackedImages):
            images = self.prepare(images)
            if not images:
                return self.empty_features()
        with self.autograd(grad):
            return self.run(images)

    __call__ = encode

    def autograd(self, grad: bool | None = None):
        if grad is None:
            grad = self.model.training and torch.is_grad_enabled()
        if grad:
            return torch.enable_grad()
        return torch.no_grad() if torch.is_grad_enabled() else torch.inference_mode()

    def cpu_kernels(self, device: torch.device):
        """A forward without autograd on the CPU: linear layers on weights packed once for
        oneDNN (`mixres.prepacked`, 12-16 % less time per GEMM there); elsewhere nothing.
        Around the forward only: the mode's hook costs ~1 us on every op under it."""
        return prepacked_linears(self.prepack and device.type == "cpu" and not torch.is_grad_enabled())

    def run(self, images: list[torch.Tensor] | PackedImages) -> PackedFeatures:
        """The prepared images through the model, in token-budget chunks (under `autograd`)."""
        if not isinstance(images, PackedImages):
            images = PackedImages.from_images(images, self.patch_size)
        packed = images.to(self.device, self.dtype)
        lens = packed.seqlens.tolist()
        bins = pack_into_bins(lens, self.chunk_budget(packed.patches.device))
        # within a forward, images of one length side by side where the SDPA backend
        # attends (one call on a view per length, not a gather per length per layer:
        # mixres.segments); else, and in training mode (where a family draws its random
        # augmentation image by image, in input order), the caller's order
        by_length = plans_segments(packed.patches) and not self.model.training
        key = lens.__getitem__ if by_length else None
        bins = [sorted(b, key=key) for b in bins]
        return self.run_groups(packed, bins, self._forward_or_halve)

    def _forward_or_halve(self, packed: PackedImages) -> PackedFeatures:
        """`forward`; on device out-of-memory, halve the token budget and run the chunk in parts."""
        try:
            with self.cpu_kernels(packed.patches.device):
                return self.forward(packed)
        except torch.OutOfMemoryError:
            pass  # recover outside the except block: its traceback still holds the chunk's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        lens = packed.seqlens.tolist()
        if len(lens) == 1:
            raise torch.OutOfMemoryError(f"backend {self.backend!r}: out of device memory on one image of "
                                         f"{lens[0]} tokens alone; lower max_image_tokens")
        self.max_batch_tokens, self._auto_chunks = max(1, sum(lens) // 2), False
        warnings.warn(f"backend {self.backend!r}: out of device memory on {len(lens)} images of "
                      f"{sum(lens)} tokens; max_batch_tokens halved to {self.max_batch_tokens}", stacklevel=2)
        return self.run_groups(packed, pack_into_bins(lens, self.max_batch_tokens), self._forward_or_halve)

    def empty_features(self) -> PackedFeatures:
        """The features of no images: (0, D) tokens."""
        from mixres.families import UnknownImageEncoderError

        try:
            width, prefix = self.facts.hidden_size, self.num_prefix
        except UnknownImageEncoderError:
            width, prefix = 0, 0
        return PackedFeatures(torch.zeros(0, width, device=self.device, dtype=self.dtype),
                              torch.zeros(1, dtype=torch.int32, device=self.device),
                              torch.zeros(0, 2, dtype=torch.long, device=self.device), prefix)

    @staticmethod
    def run_groups(packed: PackedImages, groups: list[list[int]], run) -> PackedFeatures:
        """`run` on each group of image indices, the images put back in input order."""
        if len(groups) == 1 and groups[0] == list(range(packed.num_images)):
            return run(packed)
        outs = [run(packed.select(g)) for g in groups]
        order = torch.tensor([i for g in groups for i in g])
        return PackedFeatures.cat(outs).select(torch.argsort(order).tolist())

    def chunk_budget(self, device: torch.device) -> int | None:
        """Tokens per forward: max_batch_tokens, or the CPU default under "auto"."""
        if self.max_batch_tokens is None and self._auto_chunks and device.type == "cpu":
            return self.cpu_chunk_tokens
        return self.max_batch_tokens

    def forward(self, packed: PackedImages) -> PackedFeatures:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(PackedImages)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, model={type(self.model).__name__}, "
                f"select_layer={self.select_layer}, max_batch_tokens={self.max_batch_tokens})")


def _is_list(images) -> bool:
    return isinstance(images, (list, tuple)) or (isinstance(images, torch.Tensor) and images.ndim == 4)

