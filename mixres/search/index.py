"""A searchable index over pooled vectors: the vectors (memory-mapped) and a faiss index of them.

    index = SearchIndex.build(vectors, kind="auto")        # (n, D) array or PooledMatrix
    scores, ids = index.search(queries, k=10)              # (q, k) each, best first; ids -1 past n
    index.vector(i)                                        # row i, L2-normalized ("more like this")

`open_folder` (mixres.search.folder) builds one from an embed folder and caches it there.
Vectors are L2-normalized as they are added unless the folder says it already normalized
them, so every score is a cosine similarity.
"""

from __future__ import annotations

import numpy as np

from mixres.search.kinds import EXACT_MAX, IndexKind, choose_kind, faiss_module, iter_rows, l2_normalize

__all__ = ["SearchIndex"]


def _parts(vectors) -> list:
    parts = getattr(vectors, "parts", None)  # a PooledMatrix: one memory map per shard
    return list(parts) if parts is not None else [np.asarray(vectors)]


class SearchIndex:
    def __init__(self, index, vectors, kind: IndexKind, normalize: bool):
        self.index, self.vectors, self.kind, self.normalize = index, vectors, kind, normalize
        kind.tune(index)

    @classmethod
    def build(cls, vectors, kind: str = "auto", *, normalize: bool = True, params: dict | None = None,
              exact_max: int = EXACT_MAX) -> SearchIndex:
        n, dim = vectors.shape
        if n == 0:
            raise ValueError("no vectors to index")
        chosen = choose_kind(kind, n, params, exact_max)
        parts = _parts(vectors)
        index = chosen.build(dim, lambda: iter_rows(parts, normalize), n)
        return cls(index, vectors, chosen, normalize)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def vector(self, i: int) -> np.ndarray:
        v = np.asarray(self.vectors[i], dtype=np.float32)[None]
        return (l2_normalize(v) if self.normalize else v)[0]

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (q, k), best first; queries are L2-normalized here."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        scores, ids = self.index.search(l2_normalize(q), int(k))
        return scores, ids

    def describe(self) -> dict:
        return {**self.kind.describe(), "rows": len(self), "dim": self.dim,
                "normalized_at_load": self.normalize, "faiss": faiss_module().__version__}

    def __repr__(self) -> str:
        return f"SearchIndex({self.kind.name}, {len(self)} x {self.dim})"
