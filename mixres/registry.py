"""The one registry type: a named table of things of one kind, with lazy entries.

Every table in mixres is a `Registry`: encoder backends, attention backends, presets,
model families, and the VLM's encoders, adapters, strategies and decoder blocks.

    BACKENDS = Registry("encoder backend")
    BACKENDS.lazy("navit", "mixres.encoders.navit")   # module imported on first `get`

    @BACKENDS.register("packed")
    class PackedEncoder(Encoder): ...

A lazy entry names the module that registers the real entry when imported, so optional
dependencies (vit-pytorch, timm, open_clip) are only imported when their entry is used.
Entries may carry keyword metadata (`register(name, priority=...)`), read with `meta`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from typing import Any

__all__ = ["Registry", "UnknownEntryError"]


class UnknownEntryError(ValueError, KeyError):
    """A name no registry entry has (a ValueError for callers, a KeyError for mappings)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry:
    """Name -> object for one kind of thing; names are unique, lazy entries import on use."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str, obj: Any = None, **meta) -> Any:
        """Register `obj` under `name`; without `obj`, a decorator that does it."""
        def add(obj):
            held = self._items.get(name)
            if held is not None and held is not obj and _qualname(held) != _qualname(obj):
                raise ValueError(f"{self.kind} {name!r} is already registered ({_qualname(held)}); "
                                 "pick another name")
            self._items[name] = obj
            self._meta[name] = meta
            if isinstance(obj, type) and "name" not in vars(obj):
                obj.name = name
            return obj
        return add if obj is None else add(obj)

    def lazy(self, name: str, module: str) -> None:
        """Say that importing `module` registers `name` (imported on first use)."""
        self._lazy[name] = module

    def _load(self, name: str) -> None:
        if name not in self._items and name in self._lazy:
            importlib.import_module(self._lazy[name])

    def get(self, name: str) -> Any:
        self._load(name)
        if name not in self._items:
            raise UnknownEntryError(self.unknown(name))
        return self._items[name]

    __getitem__ = get

    def meta(self, name: str) -> dict:
        self.get(name)
        return self._meta[name]

    def unknown(self, name: str) -> str:
        """The one-line message for a name that is not registered (with a near miss)."""
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy))

    def loaded(self) -> dict[str, Any]:
        """The entries registered so far (lazy ones only once imported), in order."""
        return dict(self._items)

    def load_all(self) -> dict[str, Any]:
        for name in list(self._lazy):
            self._load(name)
        return dict(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def _qualname(obj: Any) -> str:
    # re-importing a module (importlib.reload, a test's fresh import) re-registers the same
    # definition: same qualified name, not a clash
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def lazy_attributes(module: str, table: dict[str, str]):
    """A module's `__getattr__` that imports `table[name]` on first access of `name` and keeps
    the value in the module (PEP 562), so a package's heavy parts load only when used."""
    import sys

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[module], name, value)
        return value

    return __getattr__
