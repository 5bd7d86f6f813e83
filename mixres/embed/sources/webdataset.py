"""webdataset `.tar` shards (what img2dataset writes): one item per sample.

Members are grouped into samples by webdataset's own rule (`base_plus_ext`: the key is
the member name up to the first dot of its file name, the rest is the extension,
lower-cased; consecutive members with one key are one sample). The image is the first of
`IMAGE_EXTS` present. Key = `<shard file name>/<__key__>`.

Metadata are the sample's own fields, as clip-retrieval reads them: `__key__`, the keys of
its `.json` member as columns (img2dataset's `key`, `url`, `caption`, `status`, `width`,
...; a nested value as JSON text; a member that is no JSON object as one `json` column),
and its `.txt` as `caption` when the JSON gives none. Their types are fixed when the source
is opened: from img2dataset's sidecar `<shard>.parquet` when there is one, else from the
first sample's JSON of each shard.

Each shard's member headers are listed once when the source is opened (tarfile seeks from
header to header, so a local or range-readable remote shard is not read whole); workers
then seek to the one member they need. Nothing but headers is held in memory.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile

from mixres.embed.sources.base import Source, Unit, basename, is_url, open_file

__all__ = ["TarSource", "IMAGE_EXTS"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "pnm", "jfif")
META_EXTS = ("json", "txt")


def _list_shard(name: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(__key__, {ext: (offset, size)})] of one shard, in member order."""
    try:
        from webdataset.tariterators import base_plus_ext
    except ImportError:
        raise ValueError("reading .tar shards needs webdataset: pip install 'mixres[data]'") from None
    samples: list[tuple[str, dict]] = []
    try:
        f = open_file(name)
    except (OSError, ValueError) as e:
        raise ValueError(f"tar shard {name}: cannot open ({e})") from None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise ValueError(f"tar shard {name}: not an uncompressed tar file ({e})") from None
        try:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if base.startswith(".") or base.startswith("__"):
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                ext = ext.lower()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1].setdefault(ext, (m.offset_data, m.size))
        except tarfile.ReadError as e:
            # a torn shard: keep the samples whose headers were read; a torn last member is
            # reported when a worker reads it
            print(f"mixres embed: tar shard {name}: unreadable after {len(samples)} samples ({e}); "
                  "the rest of this shard is skipped", file=sys.stderr)
    return samples


def _json_type(value):
    import pyarrow as pa

    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()  # text, and nested values kept as JSON text


def _fields_of(samples: list[dict]) -> dict:
    """{name: pyarrow type} of the fields of these samples' metadata, in order of appearance."""
    import pyarrow as pa

    out: dict = {}
    for meta in samples:
        for k, v in meta.items():
            if v is not None and out.get(k, pa.null()) == pa.null():
                out[k] = _json_type(v)
            out.setdefault(k, pa.null())
    return {k: (pa.string() if t == pa.null() else t) for k, t in out.items()}


def sidecar(shard: str, suffix: str) -> str:
    """img2dataset's file beside a shard: 00000.tar -> 00000.parquet / 00000_stats.json."""
    return shard[:-len(".tar")] + suffix


class TarSource(Source):
    kind = "webdataset"

    def __init__(self, spec: str, shards: list[str]):
        keys, units, item_units, self._locs = [], [], [], []
        seen: dict[str, str] = {}
        for u, name in enumerate(shards):
            samples = _list_shard(name)
            units.append(Unit(name, len(samples)))
            for key, members in samples:
                k = f"{basename(name)}/{key}"
                if k in seen:  # keys are unique: a later sample with a seen key is an error row
                    members = {"__dup__": seen[k]}
                else:
                    seen[k] = name
                keys.append(k)
                item_units.append(u)
                self._locs.append(members)
        super().__init__(spec, keys, units, item_units)
        self._fields = self._find_fields()

    def _find_fields(self) -> list:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = {"__key__": pa.string()}
        side = sidecar(self.units[0].name, ".parquet") if self.units else ""
        if side and (is_url(side) or os.path.isfile(side)):
            try:
                with open_file(side) as f:
                    schema = pq.ParquetFile(f).schema_arrow
                fields.update({x.name: pa.string() if pa.types.is_null(x.type) else x.type for x in schema})
            except (OSError, ValueError):
                side = ""
        if not side or not (is_url(side) or os.path.isfile(side)):
            firsts, start = [], 0
            for unit in self.units:  # the first sample of every shard
                if unit.count:
                    try:
                        firsts.append(self._meta(start))
                    except ValueError:
                        pass
                start += unit.count
            fields.update(_fields_of(firsts))
        if any("txt" in m for m in self._locs):
            fields.setdefault("caption", pa.string())
        return [pa.field(k, t) for k, t in fields.items()]

    def metadata_fields(self) -> list:
        return list(self._fields)

    def _member(self, f, offset: int, size: int) -> bytes:
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"truncated tar member ({len(data)} of {size} bytes)")
        return data

    def read(self, pos: int) -> tuple[bytes, dict]:
        members = self._locs[pos]
        if "__dup__" in members:
            raise ValueError(f"duplicate key (already in {members['__dup__']})")
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise ValueError(f"no image member (has: {', '.join(sorted(members)) or 'nothing'})")
        u = self._item_units[pos]
        try:
            data = self._member(self._handle(u, lambda: open_file(self.units[u].name)), *members[ext])
        except OSError as e:
            raise ValueError(f"unreadable tar member ({e})") from None
        return data, self._meta(pos)

    def _meta(self, pos: int) -> dict:
        """The sample's own fields: __key__, its JSON's keys, its .txt as caption."""
        members, u = self._locs[pos], self._item_units[pos]
        try:
            f = self._handle(u, lambda: open_file(self.units[u].name))
            text = {m: self._member(f, *members[m]).decode("utf-8", "replace")
                    for m in META_EXTS if m in members}
        except OSError as e:
            raise ValueError(f"unreadable tar member ({e})") from None
        meta = {"__key__": self.keys[pos].split("/", 1)[1]}
        if "json" in text:
            try:
                obj = json.loads(text["json"])
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                meta.update({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in obj.items()})
            else:
                meta["json"] = text["json"]
        if "txt" in text and meta.get("caption") is None:
            meta["caption"] = text["txt"]
        return meta
