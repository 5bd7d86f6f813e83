"""An embed folder opened for search: checked, indexed (from its cache when it can), items by id.

    folder = open_folder("out/photos", expect=model_identity(enc, pool))
    scores, ids = folder.index.search(vectors, k)
    folder.items.describe(i)        # {"id", "key", "metadata"}
    folder.thumbnails.jpeg(i)       # read from the indexed source, resized here

Refused in one line at start (ValueError): a folder `mixres verify` finds problems in, one
made with --pool none, one whose model, layer or pooling differ from the server's (the
folder's meta.json says what it was made with), or whose images were resized otherwise than
the server resizes queries (then an image of the folder would not find itself).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mixres.embed.reader import Features
from mixres.embed.state import _config_digest, _weights_probe  # what a folder records of its model
from mixres.embed.verify import verify
from mixres.images import DEFAULT_MAX_PIXELS
from mixres.preprocess import Preprocessor
from mixres.search import cache
from mixres.search.index import SearchIndex
from mixres.search.items import Items
from mixres.search.kinds import EXACT_MAX, choose_kind
from mixres.search.thumbnails import Thumbnails

__all__ = ["SearchFolder", "open_folder", "model_identity", "check_model", "folder_prep",
           "check_preprocessing"]

# what must agree between the server's encoder and the folder for a query to land near its image
_IDENTITY = ("model_class", "model_config", "weights", "select_layer", "pool")


def model_identity(enc, pool: str) -> dict:
    """The encoder's identity as `mixres embed` records it in meta.json's settings."""
    return {"model_class": type(enc.model).__name__, "model_config": _config_digest(enc.model),
            "weights": _weights_probe(enc.model), "select_layer": enc.select_layer, "pool": pool}


def check_model(root: Path, meta: dict, identity: dict) -> None:
    made = meta.get("settings", {})
    diff = [f"{k} {made.get(k)!r} (server: {identity[k]!r})" for k in _IDENTITY if made.get(k) != identity[k]]
    if diff:
        raise ValueError(f"--index {root}: made with another model, layer or pooling: {'; '.join(diff)}; "
                         f"start the server with the folder's model ({made.get('model')}), "
                         f"--select-layer {made.get('select_layer')} and --pool {made.get('pool')}")


def folder_prep(meta: dict) -> Preprocessor:
    """How the folder's images were decoded and resized; a query is prepared the same way."""
    s = meta["settings"]
    resample = s.get("resample", "")  # folders made before `decode` was a setting kept it here
    decode = s.get("decode") or (resample.split("--decode ")[1].rstrip(")") if "--decode" in resample
                                 else "pil")
    return Preprocessor(patch_size=s["patch_size"], mean_std=(s["mean"], s["std"]), decode=decode,
                        min_image_tokens=s["min_image_tokens"], max_image_tokens=s["max_image_tokens"],
                        max_pixels=s.get("max_pixels") or DEFAULT_MAX_PIXELS)  # queries keep the guard


_PREP = ("min_image_tokens", "max_image_tokens", "decode")


def check_preprocessing(root: Path, meta: dict, prep) -> None:
    want = folder_prep(meta)
    diff = [f"--{k.replace('_', '-')} {getattr(want, k)} (server: {getattr(prep, k)})"
            for k in _PREP if getattr(want, k) != getattr(prep, k)]
    if diff:
        raise ValueError(f"--index {root}: its images were resized otherwise than the server resizes "
                         f"queries: {'; '.join(diff)}; start the server with the folder's values")


def _check_folder(root: Path) -> dict:
    if not (root / "meta.json").is_file():
        raise ValueError(f"--index {root}: not an output folder of mixres embed (no meta.json)")
    problems = verify(root)
    found = [p for p in problems if not p.startswith(f"{cache.CACHE_DIR}/")]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ValueError(f"--index {root}: `mixres verify` fails: {found[0]}{more}")
    if len(found) != len(problems):  # the cache alone: rebuilt below
        cache.clear(root)
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("settings", {}).get("pool", "none") == "none":
        raise ValueError(f"--index {root}: made with --pool none, so it has no pooled vectors to search")
    return meta


@dataclass
class SearchFolder:
    root: Path
    meta: dict
    index: SearchIndex
    items: Items
    thumbnails: Thumbnails
    from_cache: bool

    @property
    def model(self) -> str:
        return str(self.meta.get("model", ""))


def open_folder(root, *, expect: dict | None = None, prep=None, kind: str = "auto",
                params: dict | None = None, exact_max: int = EXACT_MAX, log=None) -> SearchFolder:
    """Check, index (or load the cached index) and open the items of an embed folder.

    expect  `model_identity(...)` of the server's encoder: refuse a folder made otherwise
    prep    how the server decodes and resizes queries (a `Preprocessor`): refuse a folder resized otherwise
    kind    auto | flat | ivf | hnsw (mixres.search.kinds); params override the kind's defaults
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = Path(root)
    meta = _check_folder(root)
    if expect is not None:
        check_model(root, meta, expect)
    if prep is not None:
        check_preprocessing(root, meta, prep)
    features = Features(root)
    _, vectors = features.pooled()
    normalize = not meta.get("settings", {}).get("normalize", False)
    chosen = choose_kind(kind, len(vectors), params, exact_max)
    fp = cache.fingerprint(root, meta, {**chosen.describe(), "normalize": normalize})
    cached = cache.load_cached(root, fp)
    if cached is not None:
        index = SearchIndex(cached, vectors, chosen, normalize)
    else:
        index = SearchIndex.build(vectors, chosen.name, normalize=normalize, params=params)
        try:
            cache.save(root, index.index, fp, index.describe())
        except OSError as e:  # a read-only folder still serves, rebuilt at every start
            log(f"mixres search: could not cache the index in {root}/{cache.CACHE_DIR} ({e})")
    items = Items(root, features)
    return SearchFolder(root, meta, index, items, Thumbnails(root, meta, items), cached is not None)
