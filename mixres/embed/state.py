"""The state of a `mixres embed` output folder: its settings, and repair after a crash.

`Settings` is everything that changes the features on disk (model, backend, layer,
pooling, preprocessing, dtypes, batching, shard size). Its fingerprint is stored in
meta.json; a rerun in the same folder with other settings is refused, naming what
changed, because mixing features of two configurations in one index would be silent
corruption. `prepare_out_dir` (rank 0, before any rank writes) applies the journal
rules of `mixres.embed.store`: torn journal lines and records whose shard is missing
are dropped, shards no record points at are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mixres.embed.store import (
    FORMAT,
    JOURNAL_GLOB,
    _fsync_dir,
    item_key,
    read_journals,
    unique_records,
    write_json,
    write_jsonl,
)

_PREPROCESSING = ("patch_size", "mean", "std", "resample", "min_image_tokens", "max_image_tokens",
                  "max_pixels")
_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _weights_probe(model: torch.nn.Module) -> str:
    """A cheap identity of the weights: names, shapes, and the bytes of the first and last tensors.

    Full hashing of a large model would cost seconds per run; a different checkpoint of
    the same architecture differs in its first and last tensors.
    """
    h = hashlib.sha256()
    params = list(model.state_dict().items())
    for name, t in params:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    for _, t in params[:2] + params[-2:]:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _config_digest(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return ""
    d = config.to_dict()
    d.pop("transformers_version", None)  # an upgrade alone does not change the features
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Settings:
    model: str
    model_class: str
    model_config: str
    weights: str
    backend: str
    select_layer: int
    pool: str
    dtype: str
    store_dtype: str
    patch_size: int
    mean: list
    std: list
    resample: str
    min_image_tokens: int
    max_image_tokens: int | None
    max_pixels: int | None
    max_batch_tokens: int | None
    shard_size: int
    num_prefix: int
    write_tokens: bool = True  # False: --no-tokens (pooled/ + metadata/ only)

    @classmethod
    def of(cls, enc, model, model_name=None, *, pool, min_image_tokens, max_image_tokens, max_pixels,
           max_batch_tokens, store_dtype, shard_size, write_tokens=True) -> Settings:
        if model_name is None:
            if isinstance(model, (str, os.PathLike)):
                model_name = os.path.abspath(model) if Path(model).exists() else os.fspath(model)
            else:
                model_name = type(enc.model).__name__
        if store_dtype == "auto":
            # bf16 has no numpy dtype; float32 holds it exactly
            store_dtype = "float16" if enc.dtype == torch.float16 else "float32"
        if store_dtype not in _STORE_DTYPES:
            raise ValueError(f"store_dtype={store_dtype!r}: choose auto, {', '.join(_STORE_DTYPES)}")
        mean, std = enc.mean_std
        return cls(model=model_name, model_class=type(enc.model).__name__,
                   model_config=_config_digest(enc.model), weights=_weights_probe(enc.model),
                   backend=enc.backend, select_layer=enc.select_layer, pool=pool,
                   dtype=str(enc.dtype).removeprefix("torch."), store_dtype=store_dtype,
                   patch_size=enc.patch_size, mean=[float(x) for x in mean], std=[float(x) for x in std],
                   resample="bicubic", min_image_tokens=min_image_tokens, max_image_tokens=max_image_tokens,
                   max_pixels=max_pixels, max_batch_tokens=max_batch_tokens, shard_size=shard_size,
                   num_prefix=enc.num_prefix, write_tokens=write_tokens)

    @property
    def torch_store_dtype(self) -> torch.dtype:
        return _STORE_DTYPES[self.store_dtype]

    def fingerprint(self) -> str:
        d = asdict(self)
        if d["write_tokens"]:
            del d["write_tokens"]  # folders made before --no-tokens existed keep their fingerprint
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _versions() -> dict:
    import numpy
    import PIL
    import safetensors
    import transformers

    import mixres
    return {"mixres": mixres.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "pillow": PIL.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def _check_settings(root: Path, meta: dict, settings: Settings) -> None:
    if meta.get("fingerprint") == settings.fingerprint():
        return
    old = meta.get("settings", {})
    new = asdict(settings)
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    raise ValueError(f"{root} holds features made with other settings ({'; '.join(diff) or 'format'}); "
                     "use another --out, or delete the folder to start over")


def _expected(paths: list[str], shard: int, size: int) -> list[tuple[int, str]]:
    lo = shard * size
    return [(p, paths[p]) for p in range(lo, min(lo + size, len(paths)))]


def record_files(rec: dict) -> list[str]:
    """The files a journal record points at (token shard, pooled, metadata)."""
    return [rec[k] for k in ("file", "pooled", "metadata") if rec.get(k)]


def _check_record(root: Path, rec: dict, paths: list[str], size: int) -> bool:
    """True: keep. False: drop (a file missing, or a shorter earlier --limit). Raises on other inputs."""
    if not all((root / f).is_file() for f in record_files(rec)):
        return False
    got = sorted([(it["pos"], item_key(it)) for it in rec["items"]] +
                 [(er["pos"], item_key(er)) for er in rec["errors"]])
    want = _expected(paths, int(rec["shard"]), size)
    if got == want:
        return True
    if got and len(got) < len(want) and got == want[:len(got)]:
        return False  # the last shard of a run with a smaller --limit: redo it whole
    for (pos, p), (_, q) in zip(got, want + [(None, "<no input>")] * len(got)):
        if p != q:
            raise ValueError(f"{root} holds features of other inputs (input #{pos} was {p}, now {q}); "
                             "use another --out for another input list")
    raise ValueError(f"{root}: shard {rec['shard']} covers {len(got)} inputs, the input list gives it "
                     f"{len(want)}; use another --out for another input list")


def _check_source(root: Path, meta: dict, source: dict) -> None:
    old = meta.get("source", {"kind": "files"})  # folders made before sources had files only
    if old == source:
        return
    if old.get("kind") != source.get("kind"):
        raise ValueError(f"{root} holds features of a {old.get('kind')} source, INPUT is a "
                         f"{source.get('kind')} source; use another --out")
    o, n = dict(map(tuple, old.get("units", []))), dict(map(tuple, source.get("units", [])))
    diff = [f"{u}: {o.get(u, 'absent')} -> {n.get(u, 'absent')} items" for u in {**o, **n}
            if o.get(u) != n.get(u)]
    diff += [f"{k}: {old.get(k)!r} -> {source.get(k)!r}" for k in sorted({*old, *source} - {"kind", "units"})
             if old.get(k) != source.get(k)]
    if not diff and list(o) != list(n):
        diff = ["the order of its files"]
    raise ValueError(f"{root} holds features of another listing of this source "
                     f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}); use another --out")


_OUTPUT_GLOBS = ("shard-*.safetensors", "pooled/*.npy", "metadata/*.parquet")


def prepare_out_dir(root: Path, settings: Settings, paths: list[str], source: dict | None = None) -> None:
    """Create or check `root` and repair what an interrupted run left (rank 0 only).

    paths   the keys of the items, in order; source  the source's `describe()`
    """
    source = source or {"kind": "files"}
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("pooled", "metadata"):
        if not (root / sub).is_dir():
            (root / sub).mkdir()
            _fsync_dir(root)
    meta_path = root / "meta.json"
    journals = read_journals(root)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        _check_settings(root, meta, settings)
        _check_source(root, meta, source)
    elif journals or any(f for g in _OUTPUT_GLOBS for f in root.glob(g)):
        raise ValueError(f"{root} holds shards or journals but no meta.json; use another --out")
    else:
        write_json(meta_path, {"format": FORMAT, "fingerprint": settings.fingerprint(), "source": source,
                               "model": settings.model, "backend": settings.backend,
                               "num_prefix": settings.num_prefix, "store_dtype": settings.store_dtype,
                               "preprocessing": {k: asdict(settings)[k] for k in _PREPROCESSING},
                               "settings": asdict(settings), "versions": _versions(),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "status": {"complete": False}})
    keep_files, seen = set(), set()
    for path, (records, clean) in journals.items():
        kept = []
        for rec in records:
            if rec["shard"] in seen or not _check_record(root, rec, paths, settings.shard_size):
                continue
            seen.add(rec["shard"])
            kept.append(rec)
            keep_files.update(record_files(rec))
        if len(kept) != len(records) or not clean:
            write_jsonl(path, kept)
    for g in _OUTPUT_GLOBS:  # orphans: written, but killed before their journal line
        for f in root.glob(g):
            if f.relative_to(root).as_posix() not in keep_files:
                f.unlink()
    for g in (".*.tmp*", "pooled/.*.tmp*", "metadata/.*.tmp*"):
        for f in root.glob(g):
            f.unlink()


def done_shards(root: Path) -> set[int]:
    return {int(r["shard"]) for r in unique_records(root)}


def finish_meta(root: Path, *, complete: bool, rows: int, errors: int) -> None:
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["status"] = {"complete": complete, "embedded": rows, "errors": errors,
                      "journals": sorted(p.name for p in root.glob(JOURNAL_GLOB)),
                      "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(meta_path, meta)
