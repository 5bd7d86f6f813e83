"""The faiss index kinds a search index can be: exact inner product, or approximate above a size.

Vectors are L2-normalized before they are added, so inner product is cosine similarity and
a score of 1 is the same direction.

    flat   IndexFlatIP: every vector scored, exact (the default up to EXACT_MAX vectors)
    ivf    IndexIVFFlat: ~4 sqrt(n) k-means cells, a query scans `nprobe` of them (the default above);
           vectors kept whole (no quantization), so its scores are exact where it looks
    hnsw   IndexHNSWFlat: a graph; builds slower than ivf, searches faster at small k

`auto` is flat up to EXACT_MAX vectors and ivf above it: at 100k vectors of dimension 512 a
flat query is a few ms on one core, and above it the scan grows linearly while an ivf query
stays near constant (`mixres bench search` measures both, with ivf's recall@10).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from mixres.registry import Registry

__all__ = ["KINDS", "EXACT_MAX", "IndexKind", "choose_kind", "faiss_module"]

KINDS = Registry("search index kind")
EXACT_MAX = 100_000


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise ValueError("search needs faiss: pip install 'mixres[search]'") from None
    return faiss


class IndexKind:
    """How to build one kind of index over n vectors of dimension dim, and how to search it.

    `name` is the registry name; `params` override the defaults (and are cached with the index).
    """

    name = "?"

    def __init__(self, params: dict | None = None):
        self.params = dict(params or {})

    def describe(self) -> dict:
        return {"kind": self.name, **self.params}

    def build(self, dim: int, chunks, n: int):
        """A faiss index holding every chunk's rows, in order (ids 0..n-1)."""
        raise NotImplementedError

    def tune(self, index) -> None:
        """Search-time parameters (not stored in the faiss file, so set after every load)."""


@KINDS.register("flat")
class FlatKind(IndexKind):
    def build(self, dim: int, chunks, n: int):
        index = faiss_module().IndexFlatIP(dim)
        for c in chunks():
            index.add(c)
        return index


def _sample(chunks, n: int, want: int) -> np.ndarray:
    """Every (n // want)-th row: a deterministic training sample without reading rows twice."""
    step = max(1, n // want)
    out, seen = [], 0
    for c in chunks():
        first = (-seen) % step
        out.append(c[first::step])
        seen += len(c)
    return np.ascontiguousarray(np.concatenate(out)[:want])


@KINDS.register("ivf")
class IVFKind(IndexKind):
    @staticmethod
    def cells(n: int) -> int:
        # ~4 sqrt(n) cells (faiss' guideline), and >= 39 training points per cell
        return max(1, min(int(4 * math.sqrt(n)), n // 39))

    def build(self, dim: int, chunks, n: int):
        faiss = faiss_module()
        nlist = int(self.params.get("nlist") or self.cells(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(_sample(chunks, n, min(n, 64 * nlist)))
        for c in chunks():
            index.add(c)
        return index

    def tune(self, index) -> None:
        # 1/64 of the cells, at least 16: at 1M vectors (4000 cells) recall@10 is 1.000 in `mixres
        # bench search` at ~1/10 the cost of 1/16 of the cells, and 16 cells alone still 0.9997
        index.nprobe = int(self.params.get("nprobe") or min(index.nlist, max(16, index.nlist // 64)))


@KINDS.register("hnsw")
class HNSWKind(IndexKind):
    def build(self, dim: int, chunks, n: int):
        faiss = faiss_module()
        index = faiss.IndexHNSWFlat(dim, int(self.params.get("M", 32)), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(self.params.get("efConstruction", 80))
        for c in chunks():
            index.add(c)
        return index

    def tune(self, index) -> None:
        index.hnsw.efSearch = int(self.params.get("efSearch", 128))


def choose_kind(name: str, n: int, params: dict | None = None, exact_max: int = EXACT_MAX) -> IndexKind:
    """`auto` -> flat up to exact_max vectors, ivf above; other names as they are."""
    if name == "auto":
        name = "flat" if n <= exact_max else "ivf"
    return KINDS.get(name)(params)


def iter_rows(parts, normalize: bool, chunk: int = 65536) -> Iterator[np.ndarray]:
    """float32 rows of the (memory-mapped) parts, chunk by chunk, L2-normalized when asked."""
    for p in parts:
        for a in range(0, p.shape[0], chunk):
            c = np.ascontiguousarray(p[a:a + chunk], dtype=np.float32)
            yield l2_normalize(c) if normalize else c


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
