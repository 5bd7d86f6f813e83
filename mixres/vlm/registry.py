"""Name -> builder tables for the VLM's parts: encoders, adapters, strategies, decoder blocks.

Each part registers itself with a decorator next to its definition, so adding an
adapter or a strategy is one new class and no edit elsewhere (no isinstance ladders).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Registry", "ENCODERS", "ADAPTERS", "STRATEGIES", "BLOCKS", "register_encoder",
           "register_adapter", "register_strategy", "register_block"]


class Registry:
    """A named table of builders (classes or functions) for one kind of part."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable:
        def deco(obj):
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered "
                                 f"({self._items[name]!r}); pick another name")
            self._items[name] = obj
            if isinstance(obj, type):
                obj.name = name
            return obj
        return deco

    def get(self, name: str):
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)


ENCODERS = Registry("encoder")
ADAPTERS = Registry("adapter")
STRATEGIES = Registry("strategy")
BLOCKS = Registry("decoder block")

register_encoder = ENCODERS.register
register_adapter = ADAPTERS.register
register_strategy = STRATEGIES.register
register_block = BLOCKS.register
