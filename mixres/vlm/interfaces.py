"""The interfaces the VLM's parts meet, as typing.Protocols (checked at build time).

A part is anything with these members; nothing needs to inherit from mixres classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mixres.packing import PackedFeatures, PackedImages

__all__ = ["Tower", "Tokenizer", "LanguageModel", "missing_members", "conforms"]


def missing_members(obj, proto) -> list[str]:
    """The members of `proto` that `obj` lacks (for an error that names them)."""
    names = set(getattr(proto, "__annotations__", {})) | {
        k for k, v in vars(proto).items() if callable(v) and not k.startswith("_")}
    if "__call__" in vars(proto):
        names.add("__call__")
    return sorted(n for n in names if not hasattr(obj, n))


def conforms(obj, proto) -> bool:
    """Whether `obj` has every member of `proto`, looked up as attribute access finds them.

    Not `isinstance(obj, proto)`: from Python 3.12 a runtime protocol check looks members up
    with `inspect.getattr_static`, which misses an nn.Module's submodules and parameters
    (they live in `_modules` / `_parameters`, reached through `__getattr__`), so a language
    model whose `blocks` is an nn.ModuleList fails it there and passes on 3.11."""
    return not missing_members(obj, proto)


@runtime_checkable
class Tower(Protocol):
    """A vision tower: PackedImages -> PackedFeatures, and what preprocessing needs.

    `blocks`: its transformer blocks in order (empty for a tower without any), the units
    that activation checkpointing recomputes, torch.compile compiles and FSDP2 shards."""

    patch_size: int
    num_prefix: int
    hidden_size: int
    mean_std: tuple
    blocks: Sequence[nn.Module]

    def __call__(self, packed: PackedImages) -> PackedFeatures: ...


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> ids; `<image>` encodes to `image_token_id`. `chat_template` is None when
    the tokenizer has none (conversations are then joined plainly)."""

    vocab_size: int
    image_token_id: int
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...

    def decode(self, ids) -> str: ...


@runtime_checkable
class LanguageModel(Protocol):
    """What a strategy drives: embeddings in, packed hidden states out, a head, a cache.

    `blocks`: its layers in order (the units checkpointing, compile and FSDP2 wrap)."""

    hidden_size: int
    vocab_size: int
    max_positions: int
    blocks: Sequence[nn.Module]

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def head(self, h: torch.Tensor) -> torch.Tensor: ...

    def run(self, x: torch.Tensor, ctx) -> torch.Tensor: ...

    def new_cache(self): ...
