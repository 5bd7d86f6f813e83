"""What every encoder backend shares: preprocessing, token-budget chunking, ordering.

A backend implements `forward(packed: PackedImages) -> PackedFeatures` for one chunk;
`encode` turns user inputs into PackedImages, cuts them into `max_batch_tokens` bins
with `pack_into_bins`, runs the chunks and puts the images back in input order, so
results never depend on the chunking or on the order of the images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mixres.packing import PackedFeatures, PackedImages, pack_into_bins
from mixres.renamed import IMAGE_TOKENS, resolve_renamed

__all__ = ["Encoder", "resolve_layer", "DEFAULT_MAX_IMAGE_TOKENS"]

DEFAULT_MAX_IMAGE_TOKENS = 1024


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
                      caches and runs slower than 2k-token chunks (measured: vit-b16,
                      mixed-24, 2 cores: 11.1 s in one chunk, 9.5 s in 2048-token chunks)
    dtype, device     move the model there first (explicitly asked for by the caller)
    min_image_tokens, max_image_tokens  resize policy for PIL images and paths (tensors are used
                      as given and only validated)
    """

    backend = "base"
    cpu_chunk_tokens: int | None = None  # budget of max_batch_tokens="auto" on the CPU

    def __init__(self, model: nn.Module, *, select_layer: int = -1,
                 max_batch_tokens: int | str | None = "auto", dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, min_image_tokens: int = 1,
                 max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS, **renamed):
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
        self.model = model
        self.select_layer = select_layer
        self.max_batch_tokens = max_batch_tokens
        self.min_image_tokens, self.max_image_tokens = min_image_tokens, max_image_tokens
        self._check_select_layer()

    def _check_select_layer(self) -> None:
        """A select_layer past the model's layers fails here, at load, not at the first encode."""
        from mixres import families

        if isinstance(self.select_layer, bool) or not isinstance(self.select_layer, int):
            raise TypeError(f"select_layer must be an int, got {self.select_layer!r}")
        try:
            layers = families.num_layers(self.model)
        except families.UnknownImageEncoderError:  # a family mixres has no file for
            return
        try:
            resolve_layer(self.select_layer, layers)
        except ValueError as e:
            raise ValueError(f"backend {self.backend!r}, {type(self.model).__name__}: {e}") from None

    # what the model expects, as its family says (mixres.families via vision_utils)
    @property
    def patch_size(self) -> int:
        from mixres import vision_utils
        return vision_utils.patch_size(self.model)

    @property
    def grid_unit(self) -> int:
        """Pixels per output token along a side: PIL/path inputs are resized to multiples of it."""
        return self.patch_size

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        from mixres import vision_utils
        return vision_utils.image_mean_std(self.model)

    @property
    def num_prefix(self) -> int:
        from mixres import vision_utils
        return vision_utils.num_prefix_tokens(self.model)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    # inputs

    def prepare(self, images) -> list[torch.Tensor]:
        """User inputs -> list of normalized (C, H, W) tensors on the grid of the patch size."""
        if isinstance(images, (str, Path, torch.Tensor)) or hasattr(images, "mode"):
            images = [images]
        if all(isinstance(img, torch.Tensor) for img in images):
            return list(images)  # already resized and normalized; validated when packed
        from mixres.images import preprocess

        mean, std = self.mean_std
        out = []
        for img in images:
            if isinstance(img, torch.Tensor):
                out.append(img)
            else:
                out.append(preprocess(img, self.grid_unit, min_image_tokens=self.min_image_tokens,
                                      max_image_tokens=self.max_image_tokens, mean=mean, std=std))
        return out

    def pack(self, images) -> PackedImages:
        if isinstance(images, PackedImages):
            return images
        return PackedImages.from_images(self.prepare(images), self.patch_size)

    # execution

    def encode(self, images: Sequence | PackedImages) -> PackedFeatures:
        """Encode a list of images (CHW tensors, PIL images or paths) or PackedImages."""
        packed = self.pack(images)
        ctx = torch.enable_grad() if torch.is_grad_enabled() else torch.inference_mode()
        with ctx:
            return self._run_chunks(packed.to(self.device, self.dtype))

    __call__ = encode

    def _run_chunks(self, packed: PackedImages) -> PackedFeatures:
        bins = pack_into_bins(packed.seqlens.tolist(), self.chunk_budget(packed.patches.device))
        return self.run_groups(packed, bins, self.forward)

    @staticmethod
    def run_groups(packed: PackedImages, groups: list[list[int]], run) -> PackedFeatures:
        """`run` on each group of image indices, the images put back in input order."""
        if len(groups) == 1:
            # one group: keep the caller's order (bins sort by length)
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
