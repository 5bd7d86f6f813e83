"""Search what you embedded: an embed folder's pooled vectors in a faiss index, over HTTP.

    folder = mixres.search.open_folder("out/photos")     # checked, indexed (cached in the folder)
    scores, ids = folder.index.search(vectors, k=10)
    app.include_router(mixres.search.search_router(folder, embed))   # POST /v1/search, GET /, ...

Parts: kinds (flat / ivf / hnsw), index (SearchIndex), cache (the index cached in the
folder, checked by `mixres verify`), items (id <-> key, metadata), thumbnails (read back
from the indexed source), folder (open_folder), api (the router), page.html, app (a server
on its own). Imported on first use, so `mixres verify` can check the cache without faiss.
"""

from mixres.registry import lazy_attributes

_LAZY = {
    "SearchIndex": "mixres.search.index",
    "SearchFolder": "mixres.search.folder",
    "open_folder": "mixres.search.folder",
    "model_identity": "mixres.search.folder",
    "search_router": "mixres.search.api",
    "LocalEmbedder": "mixres.search.app",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
