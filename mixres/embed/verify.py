"""`mixres verify OUT`: check an output folder of `mixres embed` and name every problem.

Checks that every index row resolves to a shard and a row in it, that keys are unique,
that index, token shards, pooled/ and metadata/ agree in counts and order, that every
file is complete and readable, and that nothing is on disk that the index does not know
(the search index a server caches in search/ included).
One line per problem; exit status 1 when there is any.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from mixres.embed.store import FORMAT, item_key, metadata_name, pooled_name, schema_from_json, unique_records
from mixres.search.cache import check_cache

__all__ = ["verify", "add_arguments", "run"]


def _read_jsonl(path: Path, problems: list[str]) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            problems.append(f"{path.name} line {n}: not valid JSON")
            continue
        rows[-1]["_line"] = n
    return rows


def _check_tokens(root: Path, name: str, rows: list[dict], problems: list[str]) -> None:
    from safetensors.numpy import load_file

    path = root / name
    if not path.is_file():
        problems.append(f"{name}: missing (index rows {_lines(rows)} point at it)")
        return
    try:
        t = load_file(path)
    except Exception as e:  # a torn file fails in the header or the buffer size
        problems.append(f"{name}: unreadable or incomplete ({type(e).__name__}: {e})")
        return
    missing = [k for k in ("tokens", "cu_seqlens", "grid_hw") if k not in t]
    if missing:
        problems.append(f"{name}: no {', '.join(missing)} tensor")
        return
    cu, n = t["cu_seqlens"], len(t["cu_seqlens"]) - 1
    if int(cu[-1]) != t["tokens"].shape[0]:
        problems.append(f"{name}: cu_seqlens ends at {int(cu[-1])}, tokens has {t['tokens'].shape[0]} rows")
    if len(rows) != n:
        problems.append(f"{name}: holds {n} rows, index.jsonl points at it {len(rows)} times")
    for r in rows:
        i = r.get("row")
        if not isinstance(i, int) or not 0 <= i < n:
            problems.append(f"index.jsonl line {r['_line']}: row {i!r} is not in {name} ({n} rows)")
            continue
        if list(t["grid_hw"][i]) != list(r.get("grid", [])) or int(cu[i + 1] - cu[i]) != r.get("tokens"):
            problems.append(f"index.jsonl line {r['_line']}: grid/tokens differ from {name} row {i}")


def _check_pooled(root: Path, part: int, rows: list[dict], problems: list[str], layout: str) -> None:
    import numpy as np

    name = pooled_name(part, layout)
    try:
        a = np.load(root / name, mmap_mode="r")
    except FileNotFoundError:
        problems.append(f"{name}: missing (index rows {_lines(rows)} point at it)")
        return
    except Exception as e:
        problems.append(f"{name}: unreadable or incomplete ({type(e).__name__}: {e})")
        return
    if a.ndim != 2 or a.shape[0] != len(rows):
        problems.append(f"{name}: shape {a.shape}, index.jsonl has {len(rows)} rows of shard {part}")


def _check_metadata(root: Path, part: int, rows: list[dict], problems: list[str], layout: str,
                    schema) -> None:
    import pyarrow.parquet as pq

    name = metadata_name(part, layout)
    if not (root / name).is_file():
        problems.append(f"{name}: missing (index rows {_lines(rows)} point at it)")
        return
    try:
        got = pq.read_schema(root / name)
        if schema is not None and not got.remove_metadata().equals(schema):
            problems.append(f"{name}: its schema differs from the folder's (meta.json metadata_schema)")
        column = "mixres_key" if "mixres_key" in got.names else "key"  # folders before mixres_ columns
        keys = pq.read_table(root / name, columns=[column]).column(column).to_pylist()
    except Exception as e:
        problems.append(f"{name}: unreadable or incomplete ({type(e).__name__}: {e})")
        return
    want = [r["key"] for r in sorted(rows, key=lambda r: r.get("row", -1))]
    if keys != want:
        problems.append(f"{name}: {len(keys)} keys that differ from index.jsonl's {len(want)} rows "
                        f"of shard {part} (in row order)")


def _lines(rows: list[dict]) -> str:
    lines = [str(r["_line"]) for r in rows]
    return ", ".join(lines[:5]) + (", ..." if len(lines) > 5 else "")


def verify(root) -> list[str]:
    """Every problem of the folder, one line each ([] when it is sound)."""
    root = Path(root)
    problems: list[str] = []
    if not (root / "meta.json").is_file():
        return [f"{root}: no meta.json (not an output folder of mixres embed)"]
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        problems.append(f"meta.json: format {meta.get('format')!r}, expected {FORMAT!r}")
    if not meta.get("status", {}).get("complete"):
        problems.append("meta.json: the run did not finish (rerun the same command to complete it)")
    if not (root / "index.jsonl").is_file():
        return problems + ["index.jsonl: missing"]
    rows = _read_jsonl(root / "index.jsonl", problems)
    seen: dict[str, int] = {}
    by_part: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        key = r.get("key", r.get("path"))
        if key in seen:
            problems.append(f"index.jsonl line {r['_line']}: key {key!r} also at line {seen[key]}")
        else:
            seen[key] = r["_line"]
        r["key"] = key
        by_part[r.get("part", r.get("shard"))].append(r)
    pooled = meta.get("settings", {}).get("pool", "none") != "none"
    layout = meta.get("settings", {}).get("layout", "mixres")
    schema = schema_from_json(meta["metadata_schema"]) if "metadata_schema" in meta else None
    known = set()
    for part, prows in sorted(by_part.items(), key=lambda kv: str(kv[0])):
        shards = {r.get("shard") for r in prows}
        if len(shards) > 1:
            problems.append(f"index.jsonl: rows of shard {part} point at several files "
                            f"({', '.join(sorted(map(str, shards)))})")
        name = next(iter(shards))
        if name:
            known.add(name)
            _check_tokens(root, name, prows, problems)
        if isinstance(part, int):
            if pooled:
                known.add(pooled_name(part, layout))
                _check_pooled(root, part, prows, problems, layout)
            known.add(metadata_name(part, layout))
            _check_metadata(root, part, prows, problems, layout, schema)
    for pattern in ("shard-*.safetensors", "pooled/*.npy", "img_emb/*.npy", "metadata/*.parquet"):
        for f in sorted(root.glob(pattern)):
            if f.relative_to(root).as_posix() not in known:
                problems.append(f"{f.relative_to(root)}: on disk but no index row points at it")
    records = unique_records(root)  # a shard journaled twice (a retried Ray task) is one shard
    journal_rows = sum(len(rec["items"]) for rec in records)
    if journal_rows != len(rows):
        problems.append(f"index.jsonl has {len(rows)} rows, the journals {journal_rows} "
                        "(doubled or lost rows)")
    journal_keys = sorted(item_key(it) for rec in records for it in rec["items"])
    if journal_rows == len(rows) and journal_keys != sorted(seen):
        problems.append("index.jsonl: its keys differ from the journals'")
    if (root / "errors.jsonl").is_file():
        _read_jsonl(root / "errors.jsonl", problems)
    return problems + check_cache(root)  # the search index cached here (mixres.search.cache)


def add_arguments(p) -> None:
    p.add_argument("out", metavar="OUT", help="an output folder of mixres embed")


def run(args) -> int:
    problems = verify(args.out)
    for line in problems:
        print(f"mixres verify: {args.out}: {line}")
    if problems:
        return 1
    rows = sum(1 for x in (Path(args.out) / "index.jsonl").read_text().splitlines() if x.strip())
    print(f"mixres verify: {args.out}: OK ({rows} items)")
    return 0
