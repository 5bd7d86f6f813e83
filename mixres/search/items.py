"""The items of an indexed folder: id <-> key, and each item's metadata columns.

An item's id is its row in index.jsonl (input order), which is also its row in the search
index. Metadata comes from metadata/NNNNNN.parquet, the source's own columns (`url`,
`caption`, `key`, a tar sample's `.json` fields / `txt`, a parquet file's other columns);
mixres' own columns (`mixres_key`, grid, tokens, sha256, ...) are left out. A few metadata
files are held in memory at a time.
"""

from __future__ import annotations

import datetime
import math
import threading
from collections import OrderedDict
from pathlib import Path

from mixres.embed.reader import Features
from mixres.embed.store import metadata_name

__all__ = ["Items"]

# what mixres writes into every metadata row (not the source's): mixres_* columns; folders made
# before those names had these, and wrote a source column of the same name as meta_<name>
_OLD_OWN = frozenset({"key", "source", "grid_h", "grid_w", "tokens", "sha256"})


def source_columns(row: dict) -> dict:
    """The source's own columns of a metadata row, under the source's names."""
    if "mixres_key" in row:
        return {k: v for k, v in row.items() if not k.startswith("mixres_")}
    out = {}
    for k, v in row.items():
        if k not in _OLD_OWN:
            out[k.removeprefix("meta_") if k.removeprefix("meta_") in _OLD_OWN else k] = v
    return out


def _plain(v):
    """A JSON-safe value: numbers, strings, booleans and None as they are, dates as ISO text."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray)):
        return None
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class Items:
    def __init__(self, root: Path, features: Features, cache_files: int = 4):
        self.root = Path(root)
        self.rows = features.index
        self._by_key = {r["key"]: i for i, r in enumerate(self.rows)}
        self._tables: OrderedDict[int, list[dict]] = OrderedDict()
        self._cache_files = cache_files
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def id_of(self, key: str) -> int | None:
        return self._by_key.get(key)

    def key_of(self, i: int) -> str:
        return self.rows[i]["key"]

    def source_of(self, i: int) -> str:
        return self.rows[i].get("source", "")

    def _metadata_rows(self, part: int) -> list[dict]:
        import pyarrow.parquet as pq

        with self._lock:
            if part not in self._tables:
                self._tables[part] = pq.read_table(self.root / metadata_name(part)).to_pylist()
                while len(self._tables) > self._cache_files:
                    self._tables.popitem(last=False)
            self._tables.move_to_end(part)
            return self._tables[part]

    def metadata(self, i: int) -> dict:
        """The source's own columns of item i."""
        r = self.rows[i]
        if not isinstance(r.get("part"), int):
            return {}
        row = self._metadata_rows(r["part"])[r["row"]]
        return {k: _plain(v) for k, v in source_columns(row).items()}

    def describe(self, i: int) -> dict:
        return {"id": i, "key": self.key_of(i), "metadata": self.metadata(i)}
