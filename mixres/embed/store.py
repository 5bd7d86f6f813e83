"""On-disk format of `mixres embed` and its crash-safe journal (read back by `embed.reader`).

    DIR/
      meta.json                   settings (+ their fingerprint), preprocessing, versions, status
      shard-000000.safetensors    the features of inputs [0, S), S = shard_size; one per shard
      shard-000001.safetensors    ...
      pooled/000000.npy           (B, D') pooled vectors of shard 0's rows (pool != "none"), in the
                                  --pooled-dtype, L2-normalized under --normalize
      metadata/000000.parquet     shard 0's rows in the same order: mixres_key, mixres_source,
                                  mixres_grid_h, mixres_grid_w, mixres_tokens, mixres_sha256, then
                                  the source's own fields under their own names, with one schema
                                  for every file of the folder (meta.json "metadata_schema")
      progress-r{rank}.jsonl      journal: one line per finished shard (its rows and errors)
      index.jsonl                 one line per embedded item, in input order: key, source, shard
                                  (token file, null with --no-tokens), part (shard number), row,
                                  grid, tokens, sha256 (+ path for file sources)
      errors.jsonl                one line per rejected item: key, source, reason (+ path)
      .lock                       the lock of the run writing here (host, pid, start time)

With --layout clip-retrieval the pooled vectors are img_emb/img_emb_NNNNNN.npy and the
metadata metadata/metadata_NNNNNN.parquet, the names clip-retrieval writes (zero-padded, so
that name order is shard order), so `clip-retrieval index` and `autofaiss build_index` read
the folder as their own.

A shard holds plain tensors, so `safetensors.numpy.load_file` reads it with numpy alone:

    tokens      (N, D)    float32 or float16 (meta.json "store_dtype"; bf16 has no numpy
                          dtype, so bf16 models are stored as float32), every image's tokens
                          concatenated without padding, prefix tokens first
    cu_seqlens  (B+1,)    int64 offsets of each row's tokens
    grid_hw     (B, 2)    int64 patch grid of each row
    pooled      (B, D')   only when features were pooled (pool != "none")

Why a journal: a shard (and its pooled/ and metadata/ files) is written to a temporary
name, fsynced and renamed, and only then is its journal line appended (and fsynced). So
after a `kill -9` at any moment a file on disk without a journal line is an orphan
(deleted on restart), a journal line always points at complete files, and a torn last
line is dropped. Each rank appends to
its own journal, so ranks never write the same file; `index.jsonl` / `errors.jsonl`
are derived from the journals (in input order) when a run ends.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["FORMAT", "LAYOUTS", "MIXRES_COLUMNS", "shard_name", "pooled_name", "metadata_name", "write_shard",
           "write_pooled", "write_metadata", "metadata_schema", "schema_to_json", "schema_from_json",
           "append_journal", "read_journals", "unique_records", "write_jsonl", "write_json", "merge_index"]

FORMAT = "mixres-features-1"
JOURNAL_GLOB = "progress-r*.jsonl"


# durable writes

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` so that `path` is either absent/old or complete: temp name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_jsonl(path: Path, rows) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.safetensors"


@dataclass(frozen=True)
class Layout:
    """Where a shard's pooled vectors and metadata go (str.format patterns of the shard number)."""

    pooled: str
    metadata: str


LAYOUTS = {
    "mixres": Layout("pooled/{:06d}.npy", "metadata/{:06d}.parquet"),
    "clip-retrieval": Layout("img_emb/img_emb_{:06d}.npy", "metadata/metadata_{:06d}.parquet"),
}


def pooled_name(shard: int, layout: str = "mixres") -> str:
    return LAYOUTS[layout].pooled.format(shard)


def metadata_name(shard: int, layout: str = "mixres") -> str:
    return LAYOUTS[layout].metadata.format(shard)


def write_pooled(root: Path, shard: int, pooled: torch.Tensor, layout: str = "mixres") -> str:
    """The (B, D') pooled vectors of a shard as .npy, rows in shard order."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, pooled.contiguous().numpy())
    name = pooled_name(shard, layout)
    write_atomic(root / name, buf.getvalue())
    return name


# metadata: mixres' own columns carry a prefix no source field may use, so a source's own
# `key`, `sha256`, `url`, `caption` ... keep their names and join with the source's tables
MIXRES_COLUMNS = ("mixres_key", "mixres_source", "mixres_grid_h", "mixres_grid_w", "mixres_tokens",
                  "mixres_sha256")


def metadata_schema(source_fields):
    """The one schema of every metadata file of a folder: mixres' columns, then the source's."""
    import pyarrow as pa

    ints = ("mixres_grid_h", "mixres_grid_w", "mixres_tokens")
    own = [pa.field(n, pa.int32() if n in ints else pa.string()) for n in MIXRES_COLUMNS]
    return pa.schema(own + list(source_fields))


def schema_to_json(schema) -> dict:
    """How meta.json records a schema: readable names and types, and Arrow's own bytes."""
    return {"fields": [[f.name, str(f.type)] for f in schema],
            "arrow": base64.b64encode(schema.serialize().to_pybytes()).decode()}


def schema_from_json(d: dict):
    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(d["arrow"])))


def _column(values: list, t):
    """`values` as an Arrow array of type `t`; a value that does not fit becomes text (string
    columns) or null, so one odd sample never changes the folder's schema."""
    import pyarrow as pa

    try:
        return pa.array(values, type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        pass
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str)
                         for v in values], type=t)
    out = []
    for v in values:
        try:
            pa.array([v], type=t)
            out.append(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
            out.append(None)
    return pa.array(out, type=t)


def write_metadata(root: Path, shard: int, rows: list[dict], metas: list[dict], schema,
                   layout: str = "mixres") -> str:
    """The metadata parquet of a shard: one row per shard row, written with the folder's schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    own = {"mixres_key": [r["key"] for r in rows], "mixres_source": [r["source"] for r in rows],
           "mixres_grid_h": [r["grid"][0] for r in rows], "mixres_grid_w": [r["grid"][1] for r in rows],
           "mixres_tokens": [r["tokens"] for r in rows], "mixres_sha256": [r["sha256"] for r in rows]}
    cols = [_column(own[f.name] if f.name in own else [m.get(f.name) for m in metas], f.type)
            for f in schema]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(cols, schema=schema), buf)
    name = metadata_name(shard, layout)
    write_atomic(root / name, buf.getvalue())
    return name


def write_shard(root: Path, shard: int, tokens: torch.Tensor, cu_seqlens: torch.Tensor,
                grid_hw: torch.Tensor, pooled: torch.Tensor | None, keys: list[str],
                num_prefix: int) -> str:
    """Write one shard durably; returns its file name (relative to `root`)."""
    from safetensors.torch import save

    tensors = {"tokens": tokens.contiguous(), "cu_seqlens": cu_seqlens.to(torch.int64).contiguous(),
               "grid_hw": grid_hw.to(torch.int64).contiguous()}
    if pooled is not None:
        tensors["pooled"] = pooled.contiguous()
    meta = {"format": FORMAT, "num_prefix": str(num_prefix), "keys": json.dumps(keys)}
    name = shard_name(shard)
    write_atomic(root / name, save(tensors, metadata=meta))
    return name


def append_journal(path: Path, record: dict) -> None:
    """Append one line and fsync it; a kill during the write leaves a torn line, dropped later."""
    new = not path.exists()
    with open(path, "a") as f:
        f.write(json.dumps(record, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if new:
        _fsync_dir(path.parent)


def _read_journal(path: Path) -> tuple[list[dict], bool]:
    """(records, clean): records up to the first torn or unparsable line."""
    records, clean = [], True
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            clean = False
            break
        if not isinstance(rec, dict) or "shard" not in rec:
            clean = False
            break
        records.append(rec)
    if data and not data.endswith(b"\n"):
        clean = False
    return records, clean


def read_journals(root: Path) -> dict[Path, tuple[list[dict], bool]]:
    return {p: _read_journal(p) for p in sorted(root.glob(JOURNAL_GLOB))}


def unique_records(root: Path) -> list[dict]:
    """Every journal record, one per shard (the first in journal-name order).

    A shard can be journaled twice: a Ray task retried after its first attempt wrote the
    shard, or two runs' workers racing a kill. Shards are a function of the inputs alone and
    written atomically, so both records point at the same complete bytes: keep one.
    """
    out, seen = [], set()
    for records, _ in read_journals(root).values():
        for rec in records:
            if rec["shard"] not in seen:
                seen.add(rec["shard"])
                out.append(rec)
    return out


def item_key(it: dict) -> str:
    return it["key"] if "key" in it else it["path"]  # journals before keys had paths only


def _named(it: dict) -> dict:
    out = {"key": item_key(it), "source": it.get("source", "")}
    if "path" in it:
        out["path"] = it["path"]
    return out


def merge_index(root: Path) -> tuple[int, int]:
    """Write index.jsonl and errors.jsonl from all journals, in input order.

    Returns (rows, errors). Call only when no rank is writing (after a barrier).
    """
    rows, errors = [], []
    for rec in unique_records(root):
        for it in rec["items"]:
            rows.append((it["pos"], {**_named(it), "shard": rec["file"], "part": rec["shard"],
                                     "row": it["row"], "grid": it["grid"], "tokens": it["tokens"],
                                     "sha256": it["sha256"]}))
        for er in rec["errors"]:
            errors.append((er["pos"], {**_named(er), "reason": er["reason"]}))
    rows.sort(key=lambda r: r[0])
    errors.sort(key=lambda r: r[0])
    write_jsonl(root / "index.jsonl", [r for _, r in rows])
    write_jsonl(root / "errors.jsonl", [e for _, e in errors])
    return len(rows), len(errors)
