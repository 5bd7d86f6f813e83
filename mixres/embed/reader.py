"""Reading a `mixres embed` output folder back: `mixres.read_features(out)`."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mixres.embed.store import FORMAT, pooled_name

__all__ = ["Features", "FeatureRecord", "PooledMatrix", "read_features"]


@dataclass
class FeatureRecord:
    """One embedded item as read back from disk."""

    key: str                     # the file's path for file sources, `<shard>/<key>`, `<file>#<row>`, ...
    tokens: torch.Tensor | None  # (n, D): prefix tokens first, then patches row-major; None: --no-tokens
    pooled: torch.Tensor | None  # (D',) or None
    grid_hw: tuple[int, int]
    num_prefix: int
    sha256: str
    source: str = ""             # the tar shard, parquet file, ... the item came from
    row: dict = field(default_factory=dict, repr=False)  # its index.jsonl line

    @property
    def path(self) -> str:
        """The key (a path, for file sources): the name this field had before keys."""
        return self.key

    def patch_grid(self) -> torch.Tensor:
        """The patch tokens as an (h, w, D) grid."""
        return self.tokens[self.num_prefix:].reshape(*self.grid_hw, -1)


class PooledMatrix:
    """The (n, D) pooled vectors of a folder: one memory-mapped pooled/NNNNNN.npy per shard.

    Nothing is read until asked: `m[i]`, `m[a:b]` and `m[[i, j]]` read those rows;
    `np.asarray(m)` makes the whole matrix; `m.parts` are the per-shard memory maps
    (e.g. to add to a faiss index shard by shard).
    """

    def __init__(self, parts: list[np.ndarray], dim: int, dtype):
        self.parts = parts
        self._starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self._starts[-1]), dim)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(self.parts) if self.parts else np.zeros(self.shape, self.dtype)
        return out.astype(dtype) if dtype is not None else out

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            if not -len(self) <= i < len(self):
                raise IndexError(f"row {i} of {len(self)}")
            i = int(i) % len(self)
            s = int(np.searchsorted(self._starts, i, side="right")) - 1
            return np.asarray(self.parts[s][i - self._starts[s]])
        rows = np.arange(len(self))[i]
        if rows.size == 0:
            return np.zeros((0, self.shape[1]), self.dtype)
        return np.stack([self[int(r)] for r in rows])

    def __repr__(self) -> str:
        return f"PooledMatrix(shape={self.shape}, dtype={self.dtype}, {len(self.parts)} shards)"


class Features(Mapping):
    """A `mixres embed` output folder as a read-only mapping: key -> FeatureRecord.

    features = mixres.read_features("out/demo")
    features["photos/cat.jpg"].tokens      # (n, D) torch tensor (file sources: by path)
    features["000003.tar/sample17"]        # tar sources: <shard file name>/<__key__>
    list(features)                         # the keys, in input order (a Mapping)
    for rec in features.records(): ...     # FeatureRecords in input order, each shard loaded once
    features[3]                            # the 4th record
    keys, vectors = features.pooled()      # (n, D) memory-mapped, no token shard read
    features.meta                          # meta.json (model, settings, source, versions)

    Before keys, iterating a Features gave records; that is now `records()`.
    """

    def __init__(self, root: str | os.PathLike, cache_shards: int = 2):
        self.root = Path(root)
        index = self.root / "index.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: no index; is {self.root} the --out folder of a "
                                    "finished `mixres embed` run? (rerun the command to finish it)")
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.layout = self.meta.get("settings", {}).get("layout", "mixres")
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.root}/meta.json: format {self.meta.get('format')!r}, "
                             f"expected {FORMAT!r}")
        with open(index) as f:
            self.index = [json.loads(line) for line in f if line.strip()]
        for r in self.index:
            r.setdefault("key", r.get("path"))  # folders made before keys
        self._by_key = {r["key"]: i for i, r in enumerate(self.index)}
        errors = self.root / "errors.jsonl"
        self.errors = [json.loads(x) for x in errors.read_text().splitlines() if x.strip()] \
            if errors.is_file() else []
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self._cache_size = cache_shards

    # the Mapping

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[str]:
        return (r["key"] for r in self.index)

    def _find(self, key) -> int | None:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return int(key) if -len(self) <= key < len(self) else None
        if not isinstance(key, (str, os.PathLike)):
            return None
        k = os.fspath(key)
        if k in self._by_key:
            return self._by_key[k]
        return self._by_key.get(os.path.abspath(k))  # file sources: a relative path finds its file

    def __contains__(self, key) -> bool:
        return not isinstance(key, (int, np.integer)) and self._find(key) is not None

    def __getitem__(self, key: str | os.PathLike | int) -> FeatureRecord:
        i = self._find(key)
        if i is None:
            raise KeyError(f"{key!r} is not in {self.root}/index.jsonl "
                           f"({len(self)} items; see errors.jsonl for rejected ones)")
        return self._record(i)

    @property
    def paths(self) -> list[str]:
        """The keys in input order (paths, for file sources)."""
        return [r["key"] for r in self.index]

    def records(self) -> Iterator[FeatureRecord]:
        """Every record in input order (what iterating a Features gave before it was a Mapping)."""
        for i in range(len(self)):
            yield self._record(i)

    # reading

    def _shard(self, name: str) -> dict:
        if name not in self._cache:
            from safetensors.torch import load_file

            self._cache[name] = load_file(self.root / name)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]

    def _record(self, i: int) -> FeatureRecord:
        row = self.index[i]
        r = row["row"]
        tokens = pooled = None
        if row.get("shard"):
            t = self._shard(row["shard"])
            a, b = int(t["cu_seqlens"][r]), int(t["cu_seqlens"][r + 1])
            tokens = t["tokens"][a:b]
            pooled = t["pooled"][r] if "pooled" in t else None
        elif (self.root / pooled_name(row["part"], self.layout)).is_file():  # --no-tokens
            pooled = torch.from_numpy(np.array(np.load(self.root / pooled_name(row["part"], self.layout),
                                                       mmap_mode="r")[r]))
        return FeatureRecord(row["key"], tokens, pooled, tuple(row["grid"]), int(self.meta["num_prefix"]),
                             row["sha256"], row.get("source", ""), row)

    def pooled(self) -> tuple[list[str], PooledMatrix]:
        """(keys, (n, D) pooled vectors) in input order, from pooled/ alone (memory-mapped)."""
        parts, keys, order = [], [], []
        for r in self.index:
            if not order or order[-1] != r["part"]:
                order.append(r["part"])
            keys.append(r["key"])
        for part in order:
            path = self.root / pooled_name(part, self.layout)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no pooled vectors (made with --pool none, or by a "
                                        "version before pooled/; `mixres verify` checks a folder)")
            parts.append(np.load(path, mmap_mode="r"))
        if sum(p.shape[0] for p in parts) != len(keys):
            raise ValueError(f"{self.root}: pooled/ holds {sum(p.shape[0] for p in parts)} rows, "
                             f"index.jsonl {len(keys)}; run `mixres verify {self.root}`")
        dim = parts[0].shape[1] if parts else 0
        return keys, PooledMatrix(parts, dim, parts[0].dtype if parts else np.float32)

    def to_packed(self, paths=None):
        """Selected items (all by default) as one PackedFeatures, in the order asked."""
        from mixres.packing import PackedFeatures, seqlens_to_cu

        recs = list(self.records()) if paths is None else [self[p] for p in paths]
        if not recs:
            raise ValueError(f"{self.root}: no features to pack")
        if recs[0].tokens is None:
            raise ValueError(f"{self.root}: made with --no-tokens; use .pooled()")
        pooled = torch.stack([r.pooled for r in recs]) if recs[0].pooled is not None else None
        return PackedFeatures(torch.cat([r.tokens for r in recs]),
                              seqlens_to_cu([r.tokens.shape[0] for r in recs]),
                              torch.tensor([r.grid_hw for r in recs], dtype=torch.long),
                              int(self.meta["num_prefix"]), pooled)

    def __repr__(self) -> str:
        return (f"Features({str(self.root)!r}, {len(self)} items, {len(self.errors)} errors, "
                f"model={self.meta.get('model')!r})")


def read_features(root: str | os.PathLike) -> Features:
    """Open the output folder of `mixres embed` (see `Features`)."""
    return Features(root)
