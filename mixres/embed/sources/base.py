"""What every source gives `mixres embed`: stable keys in a fixed order, and bytes per key.

A `Source` is listed once, in the main process, when it is opened: its `keys` (unique,
in a deterministic order) and, for containers (tar shards, parquet files), the `units`
with how many items each holds. The shard plan of `mixres embed` is a function of that
listing alone, so a rerun after `kill -9` cuts the same shards; `describe()` goes into
meta.json and a rerun whose listing differs is refused.

`read(pos)` runs in DataLoader workers: it returns the image's encoded bytes and the
item's metadata (a dict of plain values) or raises `ValueError(reason)`, which becomes a
row in errors.jsonl naming the unit and the key. Sources hold no image bytes: containers
are opened lazily in each worker and only the part being read (one tar member, one
parquet row group) is in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Source", "Unit", "open_file", "is_url"]


@dataclass(frozen=True)
class Unit:
    """One container of a source (a tar shard, a parquet file, a datasets folder)."""

    name: str   # as given / expanded: shown in index rows ("source") and in errors
    count: int  # items it contributes to the listing


def is_url(spec: str) -> bool:
    return "://" in spec


def open_file(name: str):
    """A binary, seekable file object for a local path or an fsspec URL (file://, s3://, ...)."""
    if is_url(name):
        import fsspec

        return fsspec.open(name, "rb").open()
    return open(name, "rb")


class Source:
    """Base class: `kind`, `keys`, `units`, `unit_of(pos)`, `read(pos)`, `describe()`."""

    kind = "?"

    def __init__(self, spec: str, keys: list[str], units: list[Unit], item_units: list[int]):
        self.spec, self.keys, self.units = spec, keys, units
        self._item_units = item_units  # pos -> index into units
        self._handles: dict = {}       # per-process open containers (never pickled)

    def __len__(self) -> int:
        return len(self.keys)

    def unit_of(self, pos: int) -> str:
        """The file the item's bytes are read from (the index's "source")."""
        return self.units[self._item_units[pos]].name

    def read(self, pos: int) -> tuple[bytes, dict]:
        raise NotImplementedError

    def options(self) -> dict:
        return {}

    def metadata_fields(self) -> list:
        """The pyarrow fields of the metadata `read` returns, fixed when the source is opened:
        every metadata file of a folder is written with them (types the source's own)."""
        return []

    def describe(self) -> dict:
        """What a rerun must find unchanged (stored in meta.json as "source")."""
        return {"kind": self.kind, "units": [[u.name, u.count] for u in self.units], **self.options()}

    def limit(self, n: int | None) -> Source:
        """Only the first n items (the listing, and so the plan of the first shards, is unchanged)."""
        if n is not None:
            if n < 0:
                raise ValueError(f"--limit must be >= 0, got {n}")
            self.keys = self.keys[:n]
        return self

    # worker side

    def _handle(self, key, opener):
        if self._handles.get("pid") != os.getpid():
            # a forked worker must not share a parent's file offsets: open its own
            self._handles = {"pid": os.getpid()}
        h = self._handles.get(key)
        if h is None:
            if len(self._handles) > 4:  # a few open containers per worker
                old = self._handles.pop(next(k for k in self._handles if k != "pid"))
                getattr(old, "close", lambda: None)()
            h = self._handles[key] = opener()
        return h

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __del__(self):
        handles = getattr(self, "_handles", {})
        if handles.get("pid") != os.getpid():
            return
        for k, h in handles.items():
            if k != "pid":
                try:
                    h.close()
                except Exception:
                    pass


def basename(name: str) -> str:
    return os.path.basename(name.rstrip("/"))
