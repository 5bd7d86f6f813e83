"""Thumbnails of indexed items, read back from the source the folder was embedded from.

Only what the folder's own records name is ever opened: the item's row in index.jsonl gives
its key and its unit (a file, a tar shard, a parquet file, a datasets folder), and a unit
must be one meta.json lists as the source's (for loose files, the key is the file). A
request names an id, never a path. Bytes inside a tar or parquet are read the way `mixres
embed` read them (`mixres.embed.sources`: one tar member, one parquet row group), then
decoded with the decompression-bomb guard and resized here.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from mixres.embed.sources import DatasetsFolderSource, ParquetSource, TarSource
from mixres.embed.sources.files import read_path
from mixres.registry import Registry

__all__ = ["Thumbnails", "SOURCE_READERS", "UnreadableItem"]

THUMBNAIL_SIDE = 256

# meta.json source kind -> (source description, unit name) -> a Source over that one unit
SOURCE_READERS = Registry("indexed source kind")
SOURCE_READERS.register("webdataset", lambda src, unit: TarSource(unit, [unit]))
SOURCE_READERS.register("parquet", lambda src, unit: ParquetSource(
    unit, [unit], src.get("image_column"), src.get("id_column")))
SOURCE_READERS.register("hf-datasets", lambda src, unit: DatasetsFolderSource(
    unit, unit, src.get("image_column"), src.get("id_column")))


class UnreadableItem(ValueError):
    """The item is in the index but its bytes cannot be read back from the source."""


class Thumbnails:
    def __init__(self, root: Path, meta: dict, items, side: int = THUMBNAIL_SIDE, cache_size: int = 512):
        self.root, self.items, self.side = Path(root), items, side
        self.source = meta.get("source", {"kind": "files"})  # folders made before sources: files
        self._units = {u[0] for u in self.source.get("units", [])}
        self._open: OrderedDict[str, tuple] = OrderedDict()  # unit -> (Source, key -> position)
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # sources keep one file handle per process

    def _unit(self, unit: str):
        if unit not in self._open:
            if unit not in self._units:
                raise UnreadableItem(f"its source {unit!r} is not one of the folder's source units")
            src = SOURCE_READERS.get(self.source["kind"])(self.source, unit)
            self._open[unit] = (src, {k: p for p, k in enumerate(src.keys)})
            while len(self._open) > 4:
                self._open.popitem(last=False)
        self._open.move_to_end(unit)
        return self._open[unit]

    def image_bytes(self, i: int) -> bytes:
        """The encoded image of item i, as the source holds it."""
        key = self.items.key_of(i)
        try:
            with self._lock:
                if self.source.get("kind", "files") == "files":
                    return read_path(key)
                src, pos = self._unit(self.items.source_of(i))
                if key not in pos:
                    raise UnreadableItem(f"{self.items.source_of(i)} no longer holds {key!r}")
                return src.read(pos[key])[0]
        except UnreadableItem:
            raise
        except (ValueError, OSError) as e:
            raise UnreadableItem(f"its source cannot be read ({e})") from None

    def jpeg(self, i: int) -> bytes:
        """Item i as a JPEG whose longer side is at most `side` pixels."""
        with self._lock:
            if i in self._thumbs:
                self._thumbs.move_to_end(i)
                return self._thumbs[i]
        from PIL import Image

        from mixres.images import ImageLoadError, load_image

        try:
            img = load_image(self.image_bytes(i))
        except ImageLoadError as e:
            raise UnreadableItem(f"its image cannot be decoded ({e.reason})") from None
        img.thumbnail((self.side, self.side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        with self._lock:
            self._thumbs[i] = buf.getvalue()
            while len(self._thumbs) > self._cache_size:
                self._thumbs.popitem(last=False)
        return buf.getvalue()
