"""webdataset `.tar` shards (what img2dataset writes): one item per sample.

Members are grouped into samples by webdataset's own rule (`base_plus_ext`: the key is
the member name up to the first dot of its file name, the rest is the extension,
lower-cased; consecutive members with one key are one sample). The image is the first of
`IMAGE_EXTS` present; `.json` and `.txt` members are kept as metadata. Key =
`<shard file name>/<__key__>`.

Each shard's member headers are listed once when the source is opened (tarfile seeks from
header to header, so a local or range-readable remote shard is not read whole); workers
then seek to the one member they need. Nothing but headers is held in memory.
"""

from __future__ import annotations

import sys
import tarfile

from mixres.embed.sources.base import Source, Unit, basename, open_file

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
            f = self._handle(u, lambda: open_file(self.units[u].name))
            data = self._member(f, *members[ext])
            meta = {m: self._member(f, *members[m]).decode("utf-8", "replace")
                    for m in META_EXTS if m in members}
        except OSError as e:
            raise ValueError(f"unreadable tar member ({e})") from None
        return data, meta
