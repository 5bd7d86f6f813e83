"""The state of a `mixres embed` output folder: what it was made with, and repair after a crash.

What a folder's features depend on is the model (`ModelFacts`: its class, config, weights,
dtype, patch size, mean/std, prefix tokens) and the feature fields of `EmbedConfig`
(layer, pooling, preprocessing, decoder, dtypes, shard size, layout). Together they are
the folder's `settings` in meta.json and its fingerprint; a rerun in the same folder with
other settings is refused, naming what changed, because mixing features of two
configurations in one index would be silent corruption. How fast a run goes (batch
budget, workers, device, engine) is not part of it. `prepare_out_dir` (rank 0, before any
rank writes) applies the journal rules of `mixres.embed.store`: torn journal lines and
records whose shard is missing are dropped, shards no record points at are deleted.
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

from mixres.embed.config import EmbedConfig
from mixres.embed.store import (
    FORMAT,
    JOURNAL_GLOB,
    LAYOUTS,
    _fsync_dir,
    item_key,
    read_journals,
    schema_from_json,
    schema_to_json,
    unique_records,
    write_json,
    write_jsonl,
)
from mixres.encoders import resolve_pool
from mixres.images import DEFAULT_MAX_PIXELS

__all__ = ["ModelFacts", "RunSettings", "prepare_out_dir", "done_shards", "finish_meta"]

_PREPROCESSING = ("patch_size", "mean", "std", "decode", "min_image_tokens", "max_image_tokens",
                  "max_pixels")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


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
class ModelFacts:
    """What the loaded model is, as far as its features go."""

    model: str
    model_class: str
    model_config: str
    weights: str
    dtype: str
    patch_size: int
    mean: list
    std: list
    num_prefix: int

    @classmethod
    def of(cls, enc, model, model_name: str | None = None) -> ModelFacts:
        if model_name is None:
            if isinstance(model, (str, os.PathLike)):
                model_name = os.path.abspath(model) if Path(model).exists() else os.fspath(model)
            else:
                model_name = type(enc.model).__name__
        mean, std = enc.mean_std
        return cls(model=model_name, model_class=type(enc.model).__name__,
                   model_config=_config_digest(enc.model), weights=_weights_probe(enc.model),
                   dtype=str(enc.dtype).removeprefix("torch."), patch_size=enc.patch_size,
                   mean=[float(x) for x in mean], std=[float(x) for x in std], num_prefix=enc.num_prefix)


@dataclass
class RunSettings:
    """A run's config (pool and dtypes resolved against the encoder) with the model's facts:
    what meta.json records as "settings" and fingerprints."""

    config: EmbedConfig
    facts: ModelFacts

    @classmethod
    def of(cls, config: EmbedConfig, enc, model) -> RunSettings:
        store = config.store_dtype
        if store == "auto":  # bf16 has no numpy dtype; float32 holds it exactly
            store = "float16" if enc.dtype == torch.float16 else "float32"
        pooled = store if config.pooled_dtype == "auto" else config.pooled_dtype
        max_pixels = DEFAULT_MAX_PIXELS if config.max_pixels is None else config.max_pixels
        resolved = EmbedConfig.of(config, pool=resolve_pool(config.pool, enc), store_dtype=store,
                                  pooled_dtype=pooled, backend=enc.backend, max_pixels=max_pixels)
        return cls(resolved, ModelFacts.of(enc, model, config.model_name))

    def record(self) -> dict:
        return {**asdict(self.facts), **self.config.features()}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def store_dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.config.store_dtype]

    @property
    def pooled_dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.config.pooled_dtype]


def _versions() -> dict:
    import numpy
    import PIL
    import safetensors
    import transformers

    import mixres
    return {"mixres": mixres.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "pillow": PIL.__version__, "numpy": numpy.__version__, "python": platform.python_version()}


def _upgraded(old: dict) -> dict:
    """Settings of a folder written by an earlier version, in today's names: the decoder was
    kept inside `resample`, the newer fields had their defaults, max_batch_tokens is no
    longer a setting of the features."""
    old = dict(old)
    resample = old.pop("resample", "bicubic")
    old.setdefault("decode", resample.removeprefix("bicubic (--decode ").removesuffix(")")
                   if "--decode" in resample else "pil")
    old.setdefault("write_tokens", True)
    old.setdefault("normalize", False)
    old.setdefault("layout", "mixres")
    old.setdefault("pooled_dtype", old.get("store_dtype"))
    return old


def _check_settings(root: Path, meta: dict, settings: RunSettings) -> None:
    if meta.get("fingerprint") == settings.fingerprint():
        return
    old, new = _upgraded(meta.get("settings", {})), settings.record()
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if diff:
        raise ValueError(f"{root} holds features made with other settings ({'; '.join(diff)}); "
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


_OUTPUT_GLOBS = ("shard-*.safetensors", "pooled/*.npy", "img_emb/*.npy", "metadata/*.parquet")


def prepare_out_dir(root: Path, settings: RunSettings, paths: list[str], source: dict, schema):
    """Create or check `root` and repair what an interrupted run left (rank 0 only). Returns the
    folder's metadata schema (the one recorded at its start).

    paths   the keys of the items, in order; source  the source's `describe()`
    schema  the metadata schema this source gives (a resumed folder keeps its recorded one)
    """
    root.mkdir(parents=True, exist_ok=True)
    layout = LAYOUTS[settings.config.layout]
    for sub in {layout.pooled.split("/")[0], layout.metadata.split("/")[0]}:
        if not (root / sub).is_dir():
            (root / sub).mkdir()
            _fsync_dir(root)
    meta_path = root / "meta.json"
    journals = read_journals(root)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        _check_settings(root, meta, settings)
        _check_source(root, meta, source)
        if "metadata_schema" in meta:
            schema = schema_from_json(meta["metadata_schema"])
    elif journals or any(f for g in _OUTPUT_GLOBS for f in root.glob(g)):
        raise ValueError(f"{root} holds shards or journals but no meta.json; use another --out")
    else:
        record = settings.record()
        write_json(meta_path, {"format": FORMAT, "fingerprint": settings.fingerprint(), "source": source,
                               "model": record["model"], "backend": record["backend"],
                               "num_prefix": record["num_prefix"], "store_dtype": record["store_dtype"],
                               "preprocessing": {k: record[k] for k in _PREPROCESSING},
                               "settings": record, "metadata_schema": schema_to_json(schema),
                               "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "status": {"complete": False}})
    keep_files, seen = set(), set()
    for path, (records, clean) in journals.items():
        kept = []
        for rec in records:
            if rec["shard"] in seen or not _check_record(root, rec, paths, settings.config.shard_size):
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
    for g in (".*.tmp*", "pooled/.*.tmp*", "img_emb/.*.tmp*", "metadata/.*.tmp*"):
        for f in root.glob(g):
            f.unlink()
    return schema


def done_shards(root: Path) -> set[int]:
    return {int(r["shard"]) for r in unique_records(root)}


def finish_meta(root: Path, *, complete: bool, rows: int, errors: int) -> None:
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["status"] = {"complete": complete, "embedded": rows, "errors": errors,
                      "journals": sorted(p.name for p in root.glob(JOURNAL_GLOB)),
                      "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(meta_path, meta)
