"""The search index cached inside the embed folder, so a restart loads it instead of rebuilding.

    DIR/search/index.json           fingerprint, kind and params, rows, dim, the file and its size
    DIR/search/index-<fp>.faiss     the faiss index (faiss.write_index)

The fingerprint covers what the index is a function of: the folder's settings fingerprint,
its index.jsonl (keys, files and rows, each image's sha256), whether vectors were normalized
at load, and the index kind with its parameters. A folder grown by a rerun of `mixres
embed`, or another `--index-kind`, has another fingerprint and is rebuilt.

Written like a shard: the faiss file under a temporary name, fsynced, renamed, and only
then index.json (atomically). A kill in between leaves an index.json naming the previous
file, still valid for its fingerprint. `mixres verify` checks this folder too
(`check_cache`): index.json readable, its file present with the size recorded, nothing else
there. A server that finds a problem here deletes search/ and rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from mixres.embed.store import _fsync_dir, write_json

__all__ = ["CACHE_DIR", "fingerprint", "load_cached", "save", "check_cache", "clear"]

CACHE_DIR = "search"
_INFO = "index.json"


def fingerprint(root: Path, meta: dict, spec: dict) -> str:
    h = hashlib.sha256(json.dumps([meta.get("fingerprint"), spec], sort_keys=True).encode())
    with open(root / "index.jsonl", "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def _info(root: Path) -> dict | None:
    path = root / CACHE_DIR / _INFO
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_cached(root: Path, fp: str):
    """The cached faiss index of fingerprint `fp`, or None (absent, stale or incomplete)."""
    info = _info(root)
    if not info or info.get("fingerprint") != fp:
        return None
    path = root / CACHE_DIR / str(info.get("file", ""))
    if not path.is_file() or path.stat().st_size != info.get("bytes"):
        return None
    from mixres.search.kinds import faiss_module

    return faiss_module().read_index(str(path))


def save(root: Path, index, fp: str, info: dict) -> None:
    """Write the index durably, then index.json naming it; drop older index files."""
    from mixres.search.kinds import faiss_module

    folder = root / CACHE_DIR
    folder.mkdir(exist_ok=True)
    name = f"index-{fp}.faiss"
    tmp = folder / f".{name}.tmp{os.getpid()}"
    faiss_module().write_index(index, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)
    _fsync_dir(folder)
    write_json(folder / _INFO, {**info, "fingerprint": fp, "file": name,
                                "bytes": (folder / name).stat().st_size})
    for old in [*folder.glob("index-*.faiss"), *folder.glob(".index-*.tmp*")]:
        if old.name != name:  # older indexes, and what a killed save left
            old.unlink(missing_ok=True)


def check_cache(root) -> list[str]:
    """Problems of DIR/search/ (one line each); [] when it is absent or sound."""
    folder = Path(root) / CACHE_DIR
    if not folder.is_dir():
        return []
    files = {f.name for f in folder.iterdir() if not f.name.startswith(".")}
    if not files:
        return []
    if _INFO not in files:
        return [f"{CACHE_DIR}/: index files but no {_INFO} (delete {CACHE_DIR}/ to rebuild it)"]
    info = _info(Path(root))
    if not isinstance(info, dict) or not isinstance(info.get("file"), str):
        return [f"{CACHE_DIR}/{_INFO}: unreadable (delete {CACHE_DIR}/ to rebuild it)"]
    problems = []
    path = folder / info["file"]
    if not path.is_file():
        problems.append(f"{CACHE_DIR}/{info['file']}: missing ({_INFO} names it)")
    elif path.stat().st_size != info.get("bytes"):
        problems.append(f"{CACHE_DIR}/{info['file']}: {path.stat().st_size} bytes, {_INFO} records "
                        f"{info.get('bytes')} (incomplete; delete {CACHE_DIR}/ to rebuild it)")
    for extra in sorted(files - {_INFO, info["file"]}):
        problems.append(f"{CACHE_DIR}/{extra}: on disk but {_INFO} does not name it")
    return problems


def clear(root: Path) -> None:
    shutil.rmtree(root / CACHE_DIR, ignore_errors=True)
