"""One decoded shard through the encoder onto disk: the step every engine runs.

An engine's whole job is to get each pending shard decoded (`decode_shard`, or DataLoader
workers over `SliceDataset`) and hand it to its `ShardWriter`, which encodes it, writes
the shard's files atomically and then appends its journal line (`mixres.embed.store`).
Because local ranks and Ray actors run this same step, their folders are the same.

The shard's patches are made once, by the decode worker, and binned once, by the encoder
(`Encoder.encode` cuts them into `max_batch_tokens` bins and puts the images back in
order, halving its budget after a device out-of-memory); an image that does not fit even
alone is recorded as an error.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixres.embed.inputs import SliceDataset, join_slices, plan_slices
from mixres.embed.sources import FileSource, Source
from mixres.embed.state import RunSettings
from mixres.embed.store import append_journal, write_metadata, write_pooled, write_shard
from mixres.packing import PackedFeatures, PackedImages, pool_features, seqlens_to_cu
from mixres.preprocess import Preprocessor

__all__ = ["AFTER_SHARD", "Job", "ShardWriter", "decode_shard", "make_prep", "shard_plan", "StoreError",
           "store_error", "SLICE_SIZE"]

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
SLICE_SIZE = 4  # images per DataLoader item: small, so that all workers share one shard

# Callables run as hook(stage, done) after a shard's files are written (stage "written") and
# after its journal line (stage "journaled"); done counts the shards this writer has finished,
# the current one included. Tests install them to stop a run at exact points; a run takes a
# copy when it starts, and the Ray engine ships that copy to its actors.
AFTER_SHARD: list[Callable[[str, int], None]] = []


class StoreError(ValueError):
    """An OSError while writing the folder (a full disk, a quota, a read-only mount)."""


@dataclass
class Job:
    """What the driver gives an engine: encode `shards` of `source` into `root` and journal them."""

    root: Path
    source: Source
    settings: RunSettings
    schema: object            # the folder's metadata schema (pyarrow)
    shards: list[int]         # this process's pending shards
    model: object             # as the user gave it (a Ray actor loads its own)
    enc: object               # the driver's Encoder (the local engine encodes with it)
    rank: int = 0
    lock_text: str = ""       # what the folder's lock file says while this run holds it
    hooks: list = field(default_factory=list)
    progress: bool = True

    @property
    def num_inputs(self) -> int:
        return shard_plan(len(self.source.keys), self.settings.config.shard_size, self.shards)


def shard_plan(num_inputs: int, shard_size: int, shards: list[int]) -> int:
    """How many inputs the given shards hold."""
    return sum(min((s + 1) * shard_size, num_inputs) - s * shard_size for s in shards)


def make_prep(settings: RunSettings) -> Preprocessor:
    """How a decode worker preprocesses an item for these settings (the same in every engine)."""
    c, f = settings.config, settings.facts
    return Preprocessor(patch_size=f.patch_size, mean_std=(f.mean, f.std), decode=c.decode,
                        min_image_tokens=c.min_image_tokens, max_image_tokens=c.max_image_tokens,
                        max_pixels=c.max_pixels)


def decode_shard(source: Source, shard: int, prep, shard_size: int) -> dict:
    """One whole shard, decoded in this process (the Ray engine's decode task)."""
    ds = SliceDataset(source, plan_slices([shard], len(source.keys), shard_size, SLICE_SIZE), prep)
    return join_slices([ds[i] for i in range(len(ds))])


def _named(source: Source, pos: int, key: str) -> dict:
    """How a journal line names an item: key and source (+ path for file sources)."""
    out = {"pos": pos, "key": key, "source": source.unit_of(pos)}
    if isinstance(source, FileSource):
        out["path"] = key
    return out


def _where(source: Source, pos: int, key: str) -> str:
    return key if isinstance(source, FileSource) else f"{source.unit_of(pos)}: {key}"


class ShardWriter:
    """Encodes whole shards with one encoder and writes them into `journal` (one per process)."""

    def __init__(self, root: Path, source: Source, settings: RunSettings, schema, enc, journal: Path,
                 on_error: str, log, hooks=()):
        self.root, self.source, self.settings, self.schema = root, source, settings, schema
        self.enc, self.journal, self.on_error, self.log = enc, journal, on_error, log
        self.hooks = list(hooks)
        self.done, self.encoder_seconds = 0, 0.0

    # encoding

    def _forward(self, packed: PackedImages) -> PackedFeatures:
        c = self.settings.config
        t0 = time.perf_counter()
        with torch.no_grad():  # the encoder then runs under inference_mode
            f = pool_features(self.enc.encode(packed), c.pool)
            if f.pooled is not None and c.normalize:
                f.pooled = torch.nn.functional.normalize(f.pooled.float(), dim=-1)
            if f.pooled is not None:
                f.pooled = f.pooled.to(self.settings.pooled_dtype)
            f = f.to("cpu")  # waits for the device: the encoder's time ends here
            f.tokens = f.tokens.to(self.settings.store_dtype)
        self.encoder_seconds += time.perf_counter() - t0
        return f

    def _encode(self, packed: PackedImages) -> tuple[PackedFeatures | None, dict[int, str]]:
        """Features of the shard's images in order, and {k: reason} of images that do not fit.

        The encoder halves its own token budget on out-of-memory; an OOM that reaches here is
        an image too large to run alone, found by running the shard's images one at a time."""
        try:
            return self._forward(packed), {}
        except OutOfMemoryError:
            pass  # recover outside the except block: its traceback still holds the batch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self._one_by_one(packed)

    def _one_by_one(self, packed: PackedImages) -> tuple[PackedFeatures | None, dict[int, str]]:
        out, oom = [], {}
        for i, n in enumerate(packed.seqlens.tolist()):
            try:
                out.append(self._forward(packed.select([i])))
            except OutOfMemoryError:
                oom[i] = f"out of device memory ({n} tokens alone)"
            if i in oom and torch.cuda.is_available():
                torch.cuda.empty_cache()
        return (PackedFeatures.cat(out) if out else None), oom

    # one shard

    def write(self, item: dict) -> dict:
        """Encode one decoded shard, write its files, then append its journal line.

        Returns its counts; raises ValueError under --on-error fail, StoreError when the
        folder cannot be written (the journal stays consistent: a rerun resumes).
        """
        source, on_error = self.source, self.on_error
        if on_error == "fail" and item["errors"]:
            pos, key, reason = item["errors"][0]
            raise ValueError(f"{_where(source, pos, key)}: {reason} (--on-error fail; nothing "
                             "written so far is lost; rerun with --on-error skip to record bad "
                             "inputs in errors.jsonl)")
        grid = item["grid_hw"]
        feats, oom = None, {}
        if grid.shape[0]:
            packed = PackedImages(item["patches"], grid, seqlens_to_cu(grid.prod(-1)), self.enc.patch_size)
            feats, oom = self._encode(packed)
        if oom and on_error == "fail":
            k, reason = next(iter(oom.items()))
            pos, key = item["items"][k][:2]
            raise ValueError(f"{_where(source, pos, key)}: {reason} (--on-error fail; try a smaller "
                             "--max-image-tokens)")
        good = [it for k, it in enumerate(item["items"]) if k not in oom]
        errors = list(item["errors"]) + [(*item["items"][k][:2], r) for k, r in oom.items()]
        grids = [g for k, g in enumerate(grid.tolist()) if k not in oom]
        lens = feats.seqlens.tolist() if feats is not None else []
        rows = [{**_named(source, pos, key), "row": r, "grid": grids[r], "tokens": lens[r], "sha256": sha}
                for r, (pos, key, sha, _) in enumerate(good)]
        record = {"shard": item["shard"], "file": None, "items": rows,
                  "errors": [{**_named(source, pos, key), "reason": reason}
                             for pos, key, reason in sorted(errors)]}
        try:
            if feats is not None:
                self._write_files(item["shard"], feats, good, rows, record)
                self._hook("written")
            append_journal(self.journal, record)
        except OSError as e:
            raise StoreError(store_error(self.root, e)) from None
        self.done += 1
        self._hook("journaled")
        return {"images": len(good), "tokens": sum(lens), "errors": len(errors),
                "shards": int(feats is not None)}

    def _write_files(self, shard: int, feats: PackedFeatures, good: list, rows: list, record: dict) -> None:
        """Every file of the shard durable before its journal line (see embed.store)."""
        c = self.settings.config
        if c.write_tokens:
            record["file"] = write_shard(self.root, shard, feats.tokens, feats.cu_seqlens, feats.grid_hw,
                                         feats.pooled, [it[1] for it in good], feats.num_prefix)
        if feats.pooled is not None:
            record["pooled"] = write_pooled(self.root, shard, feats.pooled, c.layout)
        record["metadata"] = write_metadata(self.root, shard, rows, [it[3] for it in good], self.schema,
                                            c.layout)

    def _hook(self, stage: str) -> None:
        for hook in self.hooks:
            hook(stage, self.done + (stage == "written"))


def store_error(root: Path, e: OSError) -> str:
    code = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
    what = e.strerror or str(e)
    hint = ("free some space, then rerun the same command: it resumes where this run stopped"
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else
            "fix the folder, then rerun the same command: it resumes where this run stopped")
    return f"cannot write to {root}: {what} (errno {e.errno}, {code}); {hint}"

