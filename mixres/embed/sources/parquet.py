"""Parquet files and `datasets` folders: one item per row.

The image column holds encoded bytes (binary) or HF `datasets` `Image` structs
`{bytes, path}` (bytes first; a struct with only a path reads that file). `image_column`
is found by itself when exactly one column can hold images. The key is the
`id_column`'s value when given, else `<file name>#<row>` (the row within that file).
Other columns of plain types (numbers, strings, booleans, dates) are kept as metadata,
under their own names and with the first file's types.

Only footers (row counts, schema) are read when the source is opened, plus the id column
when one is asked for. A worker reads one row group at a time, and only the image and
metadata columns.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

from mixres.embed.sources.base import Source, Unit, basename, is_url, open_file

__all__ = ["ParquetSource", "DatasetsFolderSource", "pick_image_column"]


def _is_binary(t) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image_struct(t) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


def _is_plain(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_temporal(t))


def pick_image_column(schema, asked: str | None, where: str) -> str:
    names = list(schema.names)
    if asked is not None:
        if asked not in names:
            raise ValueError(f"{where}: no column {asked!r} (columns: {', '.join(names)})")
        return asked
    found = [f.name for f in schema if _is_binary(f.type) or _is_image_struct(f.type)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"{where}: no column of image bytes or Image structs (columns: {', '.join(names)}); "
                         "name it with --image-column")
    raise ValueError(f"{where}: several columns could hold images ({', '.join(found)}); "
                     "choose one with --image-column")


def image_bytes(value, base: str | None) -> bytes:
    """The encoded image of a cell: bytes, or an Image struct {bytes, path}."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            p = path if is_url(path) or os.path.isabs(path) or base is None else os.path.join(base, path)
            try:
                with open_file(p) as f:
                    return f.read()
            except OSError as e:
                raise ValueError(f"Image struct without bytes; its path {path!r} is unreadable "
                                 f"({e})") from None
        value = data
    if value is None:
        raise ValueError("no image (the image cell is null)")
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"the image cell holds {type(value).__name__}, not bytes")
    return bytes(value)


def _keys_of(ids: list, name: str, offset: int, seen: dict, dups: dict) -> list[str]:
    out = []
    for r, v in enumerate(ids):
        k = f"{basename(name)}#{r}" if v is None else str(v)
        if k in seen:
            dups[offset + r] = seen[k]
        else:
            seen[k] = name
        out.append(k)
    return out


class _Rows(Source):
    """Shared by parquet files and datasets folders: rows -> (bytes, metadata)."""

    def _setup(self, schema, image_column, id_column, where):
        import pyarrow as pa

        self.image_column = pick_image_column(schema, image_column, where)
        if id_column is not None and id_column not in schema.names:
            raise ValueError(f"{where}: no column {id_column!r} for --id-column "
                             f"(columns: {', '.join(schema.names)})")
        self.id_column = id_column
        # a column that is all null in the first file has Arrow type null there: kept as text
        self._fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in schema
                        if f.name != self.image_column and (_is_plain(f.type) or pa.types.is_null(f.type))]
        self.meta_columns = [f.name for f in self._fields]

    def options(self) -> dict:
        return {"image_column": self.image_column, "id_column": self.id_column}

    def metadata_fields(self) -> list:
        return list(self._fields)

    def _check_dup(self, pos: int) -> None:
        if pos in self._dups:
            raise ValueError(f"duplicate key (already in {self._dups[pos]})")

    def _row(self, table, i: int, base: str | None) -> tuple[bytes, dict]:
        data = image_bytes(table.column(self.image_column)[i].as_py(), base)
        return data, {c: table.column(c)[i].as_py() for c in self.meta_columns}


class ParquetSource(_Rows):
    kind = "parquet"

    def __init__(self, spec: str, files: list[str], image_column=None, id_column=None):
        import pyarrow.parquet as pq

        keys, units, item_units, seen, self._dups, self._groups = [], [], [], {}, {}, []
        for u, name in enumerate(files):
            try:
                with open_file(name) as f:
                    pf = pq.ParquetFile(f)
                    if u == 0:
                        self._setup(pf.schema_arrow, image_column, id_column, f"parquet {name}")
                    elif self.image_column not in pf.schema_arrow.names:
                        cols = ", ".join(pf.schema_arrow.names)
                        raise ValueError(f"parquet {name}: no column {self.image_column!r} "
                                         f"(the first file has it; columns: {cols})")
                    n = pf.metadata.num_rows
                    starts = [0]
                    for g in range(pf.metadata.num_row_groups):
                        starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
                    ids = (pf.read(columns=[id_column]).column(0).to_pylist() if id_column
                           else [None] * n)
            except OSError as e:  # pyarrow's ArrowInvalid is an OSError/ValueError
                raise ValueError(f"parquet {name}: unreadable ({e})") from None
            keys += _keys_of(ids, name, len(keys), seen, self._dups)
            units.append(Unit(name, n))
            item_units += [u] * n
            self._groups.append(starts)
        self._first = [0]
        for unit in units:
            self._first.append(self._first[-1] + unit.count)
        super().__init__(spec, keys, units, item_units)
        self._cache: dict = {}

    def __getstate__(self):
        return {**super().__getstate__(), "_cache": {}}

    def read(self, pos: int) -> tuple[bytes, dict]:
        import pyarrow.parquet as pq

        self._check_dup(pos)
        u = self._item_units[pos]
        row = pos - self._first[u]
        starts = self._groups[u]
        g = bisect.bisect_right(starts, row) - 1
        name = self.units[u].name
        table = self._cache.get((u, g))
        if table is None:
            pf = self._handle(u, lambda: pq.ParquetFile(open_file(name)))
            try:
                table = pf.read_row_group(g, columns=[self.image_column, *self.meta_columns])
            except OSError as e:
                raise ValueError(f"unreadable row group {g} ({e})") from None
            self._cache = {(u, g): table}  # one row group per worker in memory
        base = None if is_url(name) else str(Path(name).parent)
        return self._row(table, row - starts[g], base)


class DatasetsFolderSource(_Rows):
    """A folder written by `datasets.Dataset.save_to_disk`, read through `datasets`."""

    kind = "hf-datasets"

    def __init__(self, spec: str, folder: str, image_column=None, id_column=None):
        ds = self._load(folder)
        self._setup(ds.data.schema, image_column, id_column, f"datasets folder {folder}")
        ids = ds.data.column(id_column).to_pylist() if id_column else [None] * len(ds)
        self._dups, self.folder, self.fingerprint = {}, folder, getattr(ds, "_fingerprint", "")
        keys = _keys_of(ids, folder, 0, {}, self._dups)
        super().__init__(spec, keys, [Unit(folder, len(ds))], [0] * len(ds))

    @staticmethod
    def _load(folder: str):
        try:
            import datasets
        except ImportError:
            raise ValueError("reading a datasets folder needs datasets: pip install 'mixres[data]'") from None
        ds = datasets.load_from_disk(folder)
        if not isinstance(ds, datasets.Dataset):
            raise ValueError(f"datasets folder {folder}: a DatasetDict ({', '.join(ds)}); "
                             "give the folder of one split")
        return ds

    def options(self) -> dict:
        return {**super().options(), "fingerprint": self.fingerprint}

    def read(self, pos: int) -> tuple[bytes, dict]:
        self._check_dup(pos)
        ds = self._handle(0, lambda: self._load(self.folder).with_format("arrow"))
        return self._row(ds[pos:pos + 1], 0, None)
