"""Where images come from: `open_source(INPUT)` picks the source by what INPUT is.

    folder of images / text list / JSONL / a list of paths / one image   FileSource
    .tar shards: paths, a brace pattern `shards/{000000..000099}.tar`,
        a glob, a folder of .tar files (img2dataset's output folder: its
        <shard>.parquet and <shard>_stats.json are sidecars of the tars),
        fsspec URLs (file://, s3://, ...)                                 TarSource
    .parquet: a file, a folder, a glob or URLs                            ParquetSource
    a folder written by `datasets.Dataset.save_to_disk`                   DatasetsFolderSource

Every source has stable, unique keys in a deterministic order and reads one item's
bytes in a DataLoader worker (see `base.Source`). `mixres embed`, `mixres.encode` and
the VLM manifest reader all go through here.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from mixres.embed.sources.base import Source, Unit, is_url
from mixres.embed.sources.files import IMAGE_EXTENSIONS, FileSource, collect_inputs, resolve_entry
from mixres.embed.sources.parquet import DatasetsFolderSource, ParquetSource
from mixres.embed.sources.webdataset import TarSource

__all__ = ["open_source", "expand", "Source", "Unit", "FileSource", "TarSource", "ParquetSource",
           "DatasetsFolderSource", "IMAGE_EXTENSIONS", "collect_inputs", "resolve_entry"]

_CONTAINERS = (".tar", ".parquet")


def _braces(name: str) -> list[str]:
    if "{" not in name:
        return [name]
    from braceexpand import braceexpand

    return list(braceexpand(name))


def _glob(name: str) -> list[str]:
    if not any(c in name for c in "*?["):
        return [name]
    if is_url(name):
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(name)
        return sorted(fs.unstrip_protocol(p) for p in paths)
    return sorted(os.path.abspath(p) for p in glob.glob(name, recursive=True))


def _folder_of_containers(name: str) -> list[str]:
    """The .tar or .parquet files in a folder (local or fsspec URL), sorted; [] if it is not a folder."""
    if is_url(name):
        import fsspec

        fs, path = fsspec.core.url_to_fs(name)
        if not fs.isdir(path):
            return []
        found = [fs.unstrip_protocol(p) for p in fs.find(path) if p.endswith(_CONTAINERS)]
    else:
        if not os.path.isdir(name):
            return []
        found = [os.path.abspath(p) for p in Path(name).rglob("*") if p.suffix in _CONTAINERS]
    return sorted(found)


def expand(spec) -> list[str]:
    """Braces, then globs: the container names a spec stands for, in order."""
    names = [os.fspath(s) for s in (spec if isinstance(spec, (list, tuple)) else [spec])]
    out = []
    for n in names:
        for b in _braces(n):
            out += _glob(b)
    return [n if is_url(n) else os.path.abspath(n) for n in out]


def _drop_sidecars(names: list[str]) -> list[str]:
    """img2dataset writes <shard>.parquet and <shard>_stats.json beside each <shard>.tar: they
    describe the tar, they are not a second source."""
    tars = {n[:-len(".tar")] for n in names if n.lower().endswith(".tar")}
    return [n for n in names if not (n.endswith(".parquet") and n[:-len(".parquet")] in tars
                                     or n.endswith("_stats.json") and n[:-len("_stats.json")] in tars)]


def _kind_of(names: list[str], spec) -> str | None:
    names = _drop_sidecars(names)
    suffixes = {os.path.splitext(n)[1].lower() for n in names}
    if suffixes == {".tar"}:
        return "webdataset"
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes & set(_CONTAINERS):
        raise ValueError(f"INPUT {spec}: mixes .tar and .parquet or other files "
                         f"({', '.join(sorted(suffixes))}); give one kind of source")
    return None


def _is_datasets_folder(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file()
                                                    and (p / "dataset_info.json").is_file())


def open_source(spec, *, image_column: str | None = None, id_column: str | None = None,
                limit: int | None = None) -> Source:
    """The source INPUT stands for, listed (keys in order); `limit` keeps the first items."""
    if isinstance(spec, Source):
        return spec.limit(limit)
    if isinstance(spec, (list, tuple)):
        names = [os.fspath(s) for s in spec]
        kind = _kind_of(names, "<list>") if names else None
        if kind is None:
            return FileSource(spec, collect_inputs(names, limit))
        return _containers(kind, "<list>", _drop_sidecars(expand(names)), image_column,
                           id_column).limit(limit)
    s = os.fspath(spec)
    local = Path(s).expanduser()
    if not is_url(s) and local.is_dir():
        if _is_datasets_folder(local):
            return DatasetsFolderSource(s, os.path.abspath(local), image_column, id_column).limit(limit)
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in local.rglob("*")):
            return FileSource(s, collect_inputs(local, limit))
    pattern = "{" in s or any(c in s for c in "*?[")
    if pattern:
        names = expand(s)
    elif is_url(s) or local.is_dir():
        names = _folder_of_containers(s) or ([s] if is_url(s) else [])
    else:
        names = [os.path.abspath(local)]
    kind = _kind_of(names, s) if names else None
    if kind is not None:
        return _containers(kind, s, _drop_sidecars(names), image_column, id_column).limit(limit)
    if is_url(s) or pattern:
        raise FileNotFoundError(f"INPUT {s}: matches no .tar or .parquet files")
    return FileSource(s, collect_inputs(local, limit))


def _containers(kind: str, spec: str, names: list[str], image_column, id_column) -> Source:
    if kind == "webdataset":
        return TarSource(spec, names)
    return ParquetSource(spec, names, image_column, id_column)
