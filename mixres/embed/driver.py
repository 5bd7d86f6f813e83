"""`mixres embed`: the one driver (lock, plan, resume, merge, verify) over any engine.

    embed(INPUT, OUT, model, **settings)     (settings: the fields of `EmbedConfig`)

Shard s always holds inputs [s*S, (s+1)*S) (S = --shard-size), so the plan is a function of
the source's listing and the settings alone: a rerun after `kill -9`, a run with another
batch budget or worker count, a `torchrun` run or a Ray run all cut the same shards and
write the same folder. The driver takes the folder's lock, lists the source, checks or
records the settings, repairs what a crash left, hands the pending shards to the engine
(`mixres.embed.engines`: it only encodes them and journals them), then merges the journals
into index.jsonl and marks the folder complete. Under torchrun every rank runs this driver;
rank 0 takes the lock, prepares the folder and merges, the others encode their share.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from mixres.decode import get_decoder
from mixres.embed.config import EmbedConfig
from mixres.embed.engines import ENGINES
from mixres.embed.lock import FolderLock
from mixres.embed.shards import AFTER_SHARD, Job, StoreError, store_error
from mixres.embed.sources import open_source
from mixres.embed.state import RunSettings, done_shards, finish_meta, prepare_out_dir
from mixres.embed.store import MIXRES_COLUMNS, merge_index, metadata_schema
from mixres.encoders import Encoder, make_encoder

__all__ = ["embed"]


def embed(inputs, out, model, config: EmbedConfig | None = None, **settings) -> dict:
    """Embed INPUT into the folder `out` and return a summary.

    INPUT   anything `mixres.embed.sources.open_source` takes (a folder, a text list, a JSONL, a
            list of paths, .tar shards or an img2dataset output folder, parquet, a datasets folder)
    model   a preset, a local directory, a hub id, an nn.Module or an Encoder
    config / settings  an `EmbedConfig` and/or its fields as keywords (keywords win)

    Resumes what is already in `out` (same settings and source only); one run per folder at
    a time. The summary: inputs, done_before (shards), images, tokens, errors, shards,
    seconds and images_per_s (the run's wall time), encoder_seconds and
    encoder_images_per_s (the encoders alone), stream_seconds (from the first loaded model
    to the last shard); on rank 0 also index_rows and index_errors.
    """
    t_start = time.perf_counter()
    config = EmbedConfig.of(config, **settings).check()
    get_decoder(config.decode)  # an unknown name, or cuda without a GPU: one line, before any work
    engine = ENGINES.get(config.engine)(config)
    root = Path(out)
    group = engine.start()
    lock = None
    try:
        err = None
        if group.rank == 0:  # one writer per folder, before anything is read or written
            try:
                lock = FolderLock(root).acquire()
            except ValueError as e:
                err = str(e)
        _raise(group.broadcast(err))
        source = open_source(inputs, image_column=config.image_column, id_column=config.id_column,
                             limit=config.limit)
        enc = _encoder(model, config, engine.device(group))
        run = RunSettings.of(config, enc, model)
        schema = metadata_schema(_source_fields(source))
        err = None
        if group.rank == 0:  # rank 0 checks the settings and repairs what a crash left
            try:
                schema = prepare_out_dir(root, run, source.keys, source.describe(), schema)
            except (ValueError, FileNotFoundError) as e:
                err = str(e)
            except OSError as e:  # a full disk already at the start
                err = store_error(root, e)
        _raise(group.broadcast(err))
        schema = group.broadcast(schema)  # a resumed folder keeps the schema it started with
        done = done_shards(root)
        n_shards = -(-len(source.keys) // config.shard_size)
        pending = [s for s in range(n_shards) if s not in done]
        job = Job(root, source, run, schema, pending[group.rank::group.world_size], model, enc,
                  rank=group.rank, lock_text=lock.text if lock else "", hooks=list(AFTER_SHARD),
                  progress=config.progress and group.rank == 0)
        try:
            counts = engine.run(job)
        except BaseException:
            if not group.distributed:
                _keep_index(root)
            raise
        totals = group.all_reduce([counts[k] for k in ("images", "tokens", "errors", "shards",
                                                       "encoder_seconds", "encoders")])
        stream = group.all_reduce([counts["stream_seconds"]], "MAX")[0]
        group.barrier()
        summary = {**_summary(len(source.keys), len(done), totals, stream, root), "engine": config.engine}
        if group.rank == 0:
            try:
                rows, errs = merge_index(root)
                finish_meta(root, complete=True, rows=rows, errors=errs)
            except OSError as e:
                raise StoreError(store_error(root, e)) from None
            summary.update(index_rows=rows, index_errors=errs)
        summary["seconds"] = wall = time.perf_counter() - t_start
        summary["images_per_s"] = summary["images"] / max(wall, 1e-9)
        return summary
    finally:
        if lock is not None:
            lock.release()
        engine.close()
        group.close()


def _encoder(model, config: EmbedConfig, device):
    if isinstance(model, Encoder):
        # an Encoder keeps its own settings, but the run's batch budget (and its halving after
        # an out-of-memory) must not change the caller's object: a shallow copy shares the model
        enc = copy.copy(model)
        enc.max_batch_tokens = config.max_batch_tokens
        return enc
    return make_encoder(model, backend=config.backend, select_layer=config.select_layer,
                        min_image_tokens=config.min_image_tokens, max_image_tokens=config.max_image_tokens,
                        max_batch_tokens=config.max_batch_tokens, device=device, dtype=config.dtype)


def _raise(err: str | None) -> None:
    if err:
        raise ValueError(err)


def _source_fields(source) -> list:
    fields = source.metadata_fields()
    clash = [f.name for f in fields if f.name.startswith("mixres_")]
    if clash:
        raise ValueError(f"INPUT {source.spec}: its field {clash[0]!r} uses the prefix of mixres' own "
                         f"metadata columns ({', '.join(MIXRES_COLUMNS)}); rename it in the source")
    return fields


def _keep_index(root: Path) -> None:
    """After a failed run, index.jsonl in step with what is durable (a full disk may refuse even
    that: the journals are the truth, and the next run derives the index again)."""
    try:
        rows, errs = merge_index(root)
        finish_meta(root, complete=False, rows=rows, errors=errs)
    except OSError:
        pass


def _summary(inputs: int, done: int, totals: list[float], stream: float, root: Path) -> dict:
    images, tokens, errors, shards, enc_s, encoders = totals
    return {"inputs": inputs, "done_before": done, "images": int(images), "tokens": int(tokens),
            "errors": int(errors), "shards": int(shards), "encoder_seconds": enc_s,
            "encoder_images_per_s": images * max(encoders, 1) / max(enc_s, 1e-9),
            "encoders": int(encoders), "stream_seconds": stream, "out": str(root)}
