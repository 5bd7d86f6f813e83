"""Images to features on disk: `mixres embed`, the batch job built on the library call.

`embed(INPUT, out, model=...)` (the `mixres embed` command) does what `mixres.encode`
(`mixres.encoders`) does in memory for a whole folder or list: DataLoader workers decode
and preprocess whole shards of inputs while the device encodes, in token-budget batches
from `pack_into_bins`.

Shard s always holds inputs [s*S, (s+1)*S) (S = --shard-size), and its batches are
cut from that shard alone, so the work and its results do not depend on when a run was
interrupted or on how many ranks share it: a rerun after `kill -9` or a `torchrun`
run gives the same index and the same features as one uninterrupted process. The
on-disk format and its crash-safety are in `mixres.embed.store`.

Scaling out: `torchrun --nproc_per_node K -m mixres embed ...` gives each rank every
K-th pending shard; rank 0 merges the journals into index.jsonl at the end.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import torch

from mixres.distributed import DistInfo, init_distributed
from mixres.embed.inputs import Prep, SliceDataset, join_slices, plan_slices
from mixres.embed.lock import FolderLock
from mixres.embed.sources import FileSource, Source, open_source
from mixres.embed.state import Settings, done_shards, finish_meta, prepare_out_dir
from mixres.embed.store import append_journal, merge_index, write_metadata, write_pooled, write_shard
from mixres.encoders import encode, make_encoder, resolve_pool
from mixres.packing import (
    PackedFeatures,
    PackedImages,
    check_pool,
    pack_into_bins,
    pool_features,
    seqlens_to_cu,
)
from mixres.renamed import IMAGE_TOKENS, resolve_renamed

__all__ = ["embed", "encode", "make_encoder", "resolve_pool"]  # encode: mixres.encoders, re-exported

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
DEFAULT_MAX_BATCH_TOKENS = 8192
DEFAULT_SHARD_SIZE = 64  # inputs per shard: the unit of crash-safety and of decode/encode overlap
SLICE_SIZE = 4  # images per DataLoader item: small, so that all workers share one shard


# the pipeline

def _test_kill(count: int, stage: str) -> None:
    # MIXRES_TEST_KILL_AFTER=N[:journal] kills this process right after its Nth shard is
    # written (before its journal line) or journaled: deterministic crash points for tests.
    spec = os.environ.get("MIXRES_TEST_KILL_AFTER")
    if spec:
        n, _, where = spec.partition(":")
        if int(n) == count and (where or "shard") == stage:
            os.kill(os.getpid(), signal.SIGKILL)


class _Runner:
    """Encodes shards for one rank; halves the token budget on device out-of-memory."""

    def __init__(self, enc, pool: str, budget: int | None, store_dtype: torch.dtype, on_error: str,
                 log):
        self.enc, self.pool, self.budget, self.store_dtype = enc, pool, budget, store_dtype
        self.on_error, self.log = on_error, log

    def _forward(self, packed: PackedImages) -> PackedFeatures:
        with torch.no_grad():  # the encoder then runs under inference_mode
            f = pool_features(self.enc.encode(packed), self.pool)
        return f.to("cpu", self.store_dtype)

    def _run_bin(self, packed: PackedImages, idx: list[int], out: dict, oom: dict) -> None:
        try:
            f = self._forward(packed.select(idx))
        except OutOfMemoryError:
            f = None  # recover outside the except block: its traceback still holds the batch
        if f is None:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            lens = packed.seqlens[idx].tolist()
            if len(idx) == 1:
                oom[idx[0]] = f"out of device memory ({lens[0]} tokens alone)"
                return
            self.budget = max(1, sum(lens) // 2)
            self.log(f"out of device memory on a batch of {sum(lens)} tokens; "
                     f"max_batch_tokens halved to {self.budget}")
            for sub in pack_into_bins(lens, self.budget):
                self._run_bin(packed, [idx[j] for j in sub], out, oom)
            return
        for j, i in enumerate(idx):
            out[i] = f.select([j])

    def encode_shard(self, item: dict) -> tuple[PackedFeatures | None, dict[int, str]]:
        """Features of the shard's good images in input order, and {k: reason} for OOM failures."""
        grid = item["grid_hw"]
        if grid.shape[0] == 0:
            return None, {}
        lens = grid.prod(-1)
        packed = PackedImages(item["patches"], grid, seqlens_to_cu(lens), self.enc.patch_size)
        out, oom = {}, {}
        for b in pack_into_bins(lens.tolist(), self.budget):
            self._run_bin(packed, b, out, oom)
        keep = [i for i in range(grid.shape[0]) if i in out]
        return (PackedFeatures.cat([out[i] for i in keep]) if keep else None), oom


def embed(inputs, out, model, *, backend: str = "packed", select_layer: int = -1, pool: str | None = None,
          min_image_tokens: int = 1, max_image_tokens: int | None = 1024, max_pixels: int | None = None,
          max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, device=None, dtype=None,
          store_dtype: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE, num_workers: int = 0,
          on_error: str = "skip", limit: int | None = None, progress: bool = True,
          model_name: str | None = None, image_column: str | None = None, id_column: str | None = None,
          write_tokens: bool = True, decode: str = "pil", engine: str = "local",
          ray_address: str | None = None, ray_actors: int | None = None, ray_cpus_per_decode: float = 1.0,
          ray_cpus_per_actor: int = 1, **renamed) -> dict:
    """Embed INPUT into the folder `out`; INPUT is anything `mixres.embed.sources.open_source`
    takes (folder, text list, JSONL, list of paths, .tar shards, parquet, a datasets folder).

    Resumes what is already in `out` (same settings and source only); one run per folder
    at a time. write_tokens=False (--no-tokens) writes only pooled/ and metadata/. pool as in
    `encode` (None follows the layer).
    decode  how images become tensors: "pil" (mixres.images), "fast", "cuda" (mixres.decode)
    engine="ray" runs on Ray Data (`mixres.embed.ray_engine`: ray_address None starts a local
    Ray, "auto" / "ray://..." connect; ray_actors encoder actors, default one per GPU, each
    reserving ray_cpus_per_actor CPUs (its torch threads on a CPU node)) and writes the same
    folder. Returns a summary dict.
    """
    from mixres.decode import get_decoder
    from mixres.images import DEFAULT_MAX_PIXELS

    min_image_tokens, max_image_tokens = resolve_renamed(
        renamed, IMAGE_TOKENS, "embed", min_image_tokens=min_image_tokens,
        max_image_tokens=max_image_tokens)
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error={on_error!r}: choose 'skip' or 'fail'")
    check_pool(pool, select_layer)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not write_tokens and pool == "none":
        raise ValueError("--no-tokens keeps only the pooled vectors: choose a --pool other than none")
    get_decoder(decode)  # an unknown name, or cuda without a GPU: one line, before any work
    if decode == "cuda":  # CUDA cannot run in forked DataLoader workers
        num_workers = 0
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if engine == "ray":
        from mixres.embed.ray_engine import embed_ray

        if decode == "cuda":
            raise ValueError("--engine ray decodes in CPU tasks: use --decode fast or pil with it "
                             "(--decode cuda is for the local engine)")

        return embed_ray(inputs, out, model, backend=backend, select_layer=select_layer, pool=pool,
                         min_image_tokens=min_image_tokens, max_image_tokens=max_image_tokens,
                         max_pixels=max_pixels, max_batch_tokens=max_batch_tokens, device=device, dtype=dtype,
                         store_dtype=store_dtype, shard_size=shard_size, on_error=on_error, limit=limit,
                         progress=progress, model_name=model_name, image_column=image_column,
                         id_column=id_column, write_tokens=write_tokens, ray_address=ray_address,
                         ray_actors=ray_actors, ray_cpus_per_decode=ray_cpus_per_decode,
                         ray_cpus_per_actor=ray_cpus_per_actor, decode=decode)
    if engine != "local":
        raise ValueError(f"engine={engine!r}: choose 'local' or 'ray'")
    t_start = time.perf_counter()
    dist_ = init_distributed(device)
    lock = None
    try:
        dev = dist_.device
        root = Path(out)
        err = None
        if dist_.rank == 0:  # one writer per folder, before anything is read or written
            try:
                lock = FolderLock(root).acquire()
            except ValueError as e:
                err = str(e)
        err = dist_.broadcast(err)
        if err:
            raise ValueError(err)
        source = open_source(inputs, image_column=image_column, id_column=id_column, limit=limit)
        paths = source.keys
        enc = make_encoder(model, backend=backend, select_layer=select_layer,
                           min_image_tokens=min_image_tokens, max_image_tokens=max_image_tokens,
                           max_batch_tokens="auto", device=dev, dtype=dtype)
        settings = run_settings(enc, model, model_name, pool=pool, decode=decode,
                                min_image_tokens=min_image_tokens, max_image_tokens=max_image_tokens,
                                max_pixels=max_pixels, max_batch_tokens=max_batch_tokens,
                                store_dtype=store_dtype, shard_size=shard_size, write_tokens=write_tokens)
        pool = settings.pool
        # rank 0 checks the settings and repairs what a crash left; the others wait for it
        err = None
        if dist_.rank == 0:
            try:
                prepare_out_dir(root, settings, paths, source.describe())
            except (ValueError, FileNotFoundError) as e:
                err = str(e)
        err = dist_.broadcast(err)
        if err:
            raise ValueError(err)
        done = done_shards(root)
        n_shards = -(-len(paths) // shard_size)
        pending = [s for s in range(n_shards) if s not in done]
        mine = pending[dist_.rank::dist_.world_size]
        try:
            counts = _run_shards(root, source, mine, enc, settings, dist_, dev, pool=pool,
                                 budget=max_batch_tokens, on_error=on_error, num_workers=num_workers,
                                 progress=progress and dist_.rank == 0, decode=decode)
        except BaseException:
            if not dist_.distributed:  # keep index.jsonl in step with what is durable
                rows, errs = merge_index(root)
                finish_meta(root, complete=False, rows=rows, errors=errs)
            raise
        totals = dist_.all_reduce([counts["images"], counts["tokens"], counts["errors"], counts["shards"]])
        t_enc = max(dist_.all_reduce([counts["seconds"]], "MAX")[0], 1e-9)  # the slowest rank
        dist_.barrier()
        summary = {"inputs": len(paths), "done_before": len(done), "images": int(totals[0]),
                   "tokens": int(totals[1]), "errors": int(totals[2]), "shards": int(totals[3]),
                   "encode_seconds": t_enc, "images_per_s": totals[0] / t_enc,
                   "tokens_per_s": totals[1] / t_enc, "out": str(root)}
        if dist_.rank == 0:
            rows, errs = merge_index(root)
            finish_meta(root, complete=True, rows=rows, errors=errs)
            summary.update(index_rows=rows, index_errors=errs)
        summary["wall_seconds"] = time.perf_counter() - t_start
        return summary
    finally:
        if lock is not None:
            lock.release()
        dist_.close()


def _named(source: Source, pos: int, key: str) -> dict:
    """How a journal line names an item: key and source (+ path for file sources)."""
    out = {"pos": pos, "key": key, "source": source.unit_of(pos)}
    if isinstance(source, FileSource):
        out["path"] = key
    return out


def _where(source: Source, pos: int, key: str) -> str:
    return key if isinstance(source, FileSource) else f"{source.unit_of(pos)}: {key}"


def run_settings(enc, model, model_name, *, pool, decode: str, **fields) -> Settings:
    """The settings of a run (both engines): the pool resolved against the encoder's layer,
    the decoder recorded."""
    return with_decoder(Settings.of(enc, model, model_name, pool=resolve_pool(pool, enc), **fields), decode)


def with_decoder(settings: Settings, decode: str) -> Settings:
    """Record the decoder in the settings: other pixels, other features, so a resume must use
    the same one. `pil` leaves them as they were (older folders keep their fingerprint)."""
    if decode != "pil":
        settings.resample = f"bicubic (--decode {decode})"
    return settings


def decoder_of(settings: Settings) -> str:
    m = re.fullmatch(r"bicubic \(--decode (\w+)\)", settings.resample)
    return m.group(1) if m else "pil"


def make_prep(settings: Settings) -> Prep:
    """How a decode worker preprocesses an item for these settings (the same in every engine)."""
    return Prep(settings.patch_size, tuple(settings.mean), tuple(settings.std), settings.min_image_tokens,
                settings.max_image_tokens, settings.max_pixels, decode=decoder_of(settings))


def decode_shard(source: Source, shard: int, prep: Prep, shard_size: int) -> dict:
    """One whole shard, decoded in this process (the Ray engine's decode task)."""
    ds = SliceDataset(source, plan_slices([shard], len(source.keys), shard_size, SLICE_SIZE), prep)
    return join_slices([ds[i] for i in range(len(ds))])


def finish_shard(root: Path, source: Source, item: dict, runner: _Runner, settings: Settings,
                 journal: Path, on_error: str, hook=None) -> dict:
    """Encode one decoded shard, write its files, then append its journal line.

    The one step every engine runs per shard (the local loop, each Ray encoder actor), so
    their folders are the same. Returns its counts; raises ValueError under --on-error fail.
    hook(stage, wrote) runs after the files are written ("shard") and after the journal line
    ("journal"); wrote is 1 when this shard wrote files (0: all its items were errors).
    """
    if on_error == "fail" and item["errors"]:
        pos, key, reason = item["errors"][0]
        raise ValueError(f"{_where(source, pos, key)}: {reason} (--on-error fail; nothing "
                         "written so far is lost; rerun with --on-error skip to record bad "
                         "inputs in errors.jsonl)")
    feats, oom = runner.encode_shard(item)
    if oom and on_error == "fail":
        k, reason = next(iter(oom.items()))
        pos, key = item["items"][k][:2]
        raise ValueError(f"{_where(source, pos, key)}: {reason} (--on-error fail; try a smaller "
                         "--max-image-tokens)")
    good = [it for k, it in enumerate(item["items"]) if k not in oom]
    errors = list(item["errors"]) + [(item["items"][k][0], item["items"][k][1], r) for k, r in oom.items()]
    grids = [g for k, g in enumerate(item["grid_hw"].tolist()) if k not in oom]
    lens = feats.seqlens.tolist() if feats is not None else []
    rows = [{**_named(source, pos, key), "row": r, "grid": grids[r], "tokens": lens[r], "sha256": sha}
            for r, (pos, key, sha, _) in enumerate(good)]
    files = {"file": None}
    hook = hook or (lambda stage, wrote: None)
    if feats is not None:
        # every file of the shard durable before its journal line (see embed.store)
        if settings.write_tokens:
            files["file"] = write_shard(root, item["shard"], feats.tokens, feats.cu_seqlens, feats.grid_hw,
                                        feats.pooled, [it[1] for it in good], feats.num_prefix)
        if feats.pooled is not None:
            files["pooled"] = write_pooled(root, item["shard"], feats.pooled)
        files["metadata"] = write_metadata(root, item["shard"], rows, [it[3] for it in good])
        hook("shard", 1)
    append_journal(journal, {
        "shard": item["shard"], **files, "items": rows,
        "errors": [{**_named(source, pos, key), "reason": reason} for pos, key, reason in sorted(errors)]})
    hook("journal", int(feats is not None))
    return {"images": len(good), "tokens": sum(lens), "errors": len(errors),
            "shards": int(feats is not None)}


def _run_shards(root: Path, source: Source, shards, enc, settings, dist_: DistInfo, dev, *, pool, budget,
                on_error, num_workers, progress, decode="pil") -> dict:
    from tqdm import tqdm

    prep = make_prep(settings)
    paths = source.keys
    slices = plan_slices(shards, len(paths), settings.shard_size, SLICE_SIZE)
    workers = max(0, num_workers)
    # about one shard of images in flight, so workers keep decoding while the device encodes
    prefetch = max(2, -(-settings.shard_size // (SLICE_SIZE * workers))) if workers else None
    loader = torch.utils.data.DataLoader(
        SliceDataset(source, slices, prep), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=dev.type == "cuda", prefetch_factor=prefetch)
    total = sum(min((s + 1) * settings.shard_size, len(paths)) - s * settings.shard_size for s in shards)
    bar = tqdm(total=total, unit="img", desc="embed", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    runner = _Runner(enc, pool, budget, settings.torch_store_dtype, on_error,
                     log=lambda msg: bar.write(f"mixres embed: {msg}", file=sys.stderr))
    journal = root / f"progress-r{dist_.rank}.jsonl"
    counts = {"images": 0, "tokens": 0, "errors": 0, "shards": 0}
    t0 = time.perf_counter()
    try:
        for item in _whole_shards(loader, settings.shard_size, len(paths), on_error):
            c = finish_shard(root, source, item, runner, settings, journal, on_error,
                             hook=lambda stage, wrote: _test_kill(counts["shards"] + wrote, stage))
            for k in ("images", "tokens", "errors", "shards"):
                counts[k] += c[k]
            bar.update(c["images"] + c["errors"])
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{counts['images'] / dt:.1f} img/s, {counts['tokens'] / dt:,.0f} tok/s, "
                                f"{counts['errors']} errors", refresh=False)
    finally:
        bar.close()
    counts["seconds"] = time.perf_counter() - t0
    return counts


def _whole_shards(loader, shard_size: int, num_inputs: int, on_error: str):
    """Reassemble the loader's slices into shards; under --on-error fail, stop at the first bad one."""
    parts, have = [], 0
    for part in loader:
        if on_error == "fail" and part["errors"]:
            yield part  # the caller raises on it before anything of this shard is written
        parts.append(part)
        have += len(part["items"]) + len(part["errors"])
        s = part["shard"]
        if have == min((s + 1) * shard_size, num_inputs) - s * shard_size:
            yield join_slices(parts)
            parts, have = [], 0
