"""Reading a `mixres embed` output folder back: `mixres.read_features(out)`."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mixres.embed.store import FORMAT

__all__ = ["Features", "FeatureRecord", "read_features"]


@dataclass
class FeatureRecord:
    """One embedded input as read back from disk."""

    path: str
    tokens: torch.Tensor         # (n, D): prefix tokens first, then patches row-major
    pooled: torch.Tensor | None  # (D',) or None
    grid_hw: tuple[int, int]
    num_prefix: int
    sha256: str

    def patch_grid(self) -> torch.Tensor:
        """The patch tokens as an (h, w, D) grid."""
        return self.tokens[self.num_prefix:].reshape(*self.grid_hw, -1)


class Features:
    """The features of a `mixres embed` output folder: lookup by path, iteration in input order.

    features = mixres.read_features("out/demo")
    features["photos/cat.jpg"].tokens      # (n, D) torch tensor
    for rec in features: ...               # input order, each shard loaded once
    features.meta                          # meta.json (model, settings, versions)
    """

    def __init__(self, root: str | os.PathLike, cache_shards: int = 2):
        self.root = Path(root)
        index = self.root / "index.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{index}: no index; is {self.root} the --out folder of a "
                                    "finished `mixres embed` run? (rerun the command to finish it)")
        self.meta = json.loads((self.root / "meta.json").read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.root}/meta.json: format {self.meta.get('format')!r}, "
                             f"expected {FORMAT!r}")
        with open(index) as f:
            self.index = [json.loads(line) for line in f if line.strip()]
        self._by_path = {r["path"]: i for i, r in enumerate(self.index)}
        errors = self.root / "errors.jsonl"
        self.errors = [json.loads(x) for x in errors.read_text().splitlines() if x.strip()] \
            if errors.is_file() else []
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self._cache_size = cache_shards

    def __len__(self) -> int:
        return len(self.index)

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.index]

    def _key(self, path) -> int | None:
        p = os.fspath(path)
        if p in self._by_path:
            return self._by_path[p]
        return self._by_path.get(os.path.abspath(p))

    def __contains__(self, path) -> bool:
        return self._key(path) is not None

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
        t = self._shard(row["shard"])
        r = row["row"]
        a, b = int(t["cu_seqlens"][r]), int(t["cu_seqlens"][r + 1])
        pooled = t["pooled"][r] if "pooled" in t else None
        return FeatureRecord(row["path"], t["tokens"][a:b], pooled, tuple(row["grid"]),
                             int(self.meta["num_prefix"]), row["sha256"])

    def __getitem__(self, key: str | os.PathLike | int) -> FeatureRecord:
        if isinstance(key, int):
            return self._record(key)
        i = self._key(key)
        if i is None:
            raise KeyError(f"{os.fspath(key)!r} is not in {self.root}/index.jsonl "
                           f"({len(self)} inputs; see errors.jsonl for rejected ones)")
        return self._record(i)

    def __iter__(self) -> Iterator[FeatureRecord]:
        for i in range(len(self)):
            yield self._record(i)

    def to_packed(self, paths=None):
        """Selected inputs (all by default) as one PackedFeatures, in the order asked."""
        from mixres.packing import PackedFeatures, seqlens_to_cu

        recs = list(self) if paths is None else [self[p] for p in paths]
        if not recs:
            raise ValueError(f"{self.root}: no features to pack")
        pooled = torch.stack([r.pooled for r in recs]) if recs[0].pooled is not None else None
        return PackedFeatures(torch.cat([r.tokens for r in recs]),
                              seqlens_to_cu([r.tokens.shape[0] for r in recs]),
                              torch.tensor([r.grid_hw for r in recs], dtype=torch.long),
                              int(self.meta["num_prefix"]), pooled)

    def __repr__(self) -> str:
        return (f"Features({str(self.root)!r}, {len(self)} inputs, {len(self.errors)} errors, "
                f"model={self.meta.get('model')!r})")


def read_features(root: str | os.PathLike) -> Features:
    """Open the output folder of `mixres embed` (see `Features`)."""
    return Features(root)
