"""`mixres embed --engine ray`: the same folder as the local engine, on Ray Data.

    pending shards --from_items--> decode (CPU tasks) --> encode (actors) --> driver
    one item = one whole shard   SliceDataset's decode   model loaded once    summary rows,
                                 patches as numpy arrays  per actor; packs,   then merge_index
                                                          writes, journals

The driver does what the local engine does before encoding: it takes the folder's lock,
lists the source, checks or writes the settings, repairs what a crash left and plans the
shards that are not done. Each encoder actor runs `runner.finish_shard`, the local
engine's own per-shard step (pack by token budget, halve it on out-of-memory, write the
shard, pooled/ and metadata/ atomically, then append a journal line), into a journal of
its own (progress-rray-<id>.jsonl, a new id per actor start, so a restarted actor never
appends after a torn line). A shard is a function of the inputs alone, so a retried task
that writes a shard twice writes the same bytes, and `merge_index` keeps one record.

A killed driver resumes like a local run: rerun the same command. Its actors belong to
its Ray job and die with it; one still writing when a new run starts sees that the lock
file names another run and stops before its next shard.

On a cluster, --out must be a folder every node sees (a shared filesystem), and mixres
must be importable on every node.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mixres.embed.lock import LOCK_NAME, FolderLock
from mixres.embed.runner import (
    _Runner,
    decode_shard,
    decoder_of,
    finish_shard,
    make_encoder,
    make_prep,
    run_settings,
    with_decoder,
)
from mixres.embed.sources import open_source
from mixres.embed.state import Settings, done_shards, finish_meta, prepare_out_dir
from mixres.embed.store import merge_index

__all__ = ["embed_ray", "import_ray", "start_ray"]

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'mixres[ray]' (or pip install 'ray[data]')"
MAX_RETRIES = 3  # decode tasks and encoder actors: Ray retries a failed task / restarts a dead actor


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


def _test_kill_point() -> tuple[int, int] | None:
    # MIXRES_TEST_KILL_DRIVER_AFTER=N: the encoder actor that journals its Nth shard kills the
    # driver with SIGKILL, then blocks (it dies with the driver's Ray job), so exactly N shards
    # are on disk: a deterministic crash point for tests. Killing from the driver when it has
    # *consumed* N rows is not: the actors run ahead of the driver by a varying number of shards.
    n = os.environ.get("MIXRES_TEST_KILL_DRIVER_AFTER")
    return (int(n), os.getpid()) if n else None


# the workers

def _decode(row: dict, source, prep, shard_size: int) -> dict:
    """A decode task: one whole shard -> its patches and grids as numpy arrays."""
    item = decode_shard(source, int(row["shard"]), prep, shard_size)
    return {"shard": item["shard"], "patches": item["patches"].numpy(),
            "grid_hw": item["grid_hw"].numpy(),
            "info": pickle.dumps((item["items"], item["errors"]))}


class _EncoderActor:
    """Holds the model (loaded once) and writes whole shards into its own journal."""

    def __init__(self, root: str, model, source, settings: Settings, enc_kwargs: dict, device: str,
                 on_error: str, lock_text: str, threads: int, kill_point: tuple[int, int] | None = None):
        if device == "cpu":  # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch may have read another
            torch.set_num_threads(threads)
        self.root, self.source, self.settings = Path(root), source, settings
        if not (self.root / "meta.json").is_file():
            raise ValueError(f"--out {root} is not visible on this Ray node; on a cluster give a folder "
                             "on a filesystem every node shares")
        if not isinstance(model, (str, os.PathLike, nn.Module)):  # an ObjectRef of a module or Encoder
            import ray

            model = ray.get(model)
        enc = make_encoder(model, device=device, **enc_kwargs)
        mine = Settings.of(enc, model, settings.model, pool=settings.pool,
                           min_image_tokens=settings.min_image_tokens,
                           max_image_tokens=settings.max_image_tokens, max_pixels=settings.max_pixels,
                           max_batch_tokens=settings.max_batch_tokens, store_dtype=settings.store_dtype,
                           shard_size=settings.shard_size, write_tokens=settings.write_tokens)
        with_decoder(mine, decoder_of(settings))
        if mine.fingerprint() != settings.fingerprint():
            raise ValueError(f"the model on this Ray node ({settings.model}) gives other settings than "
                             "on the driver; install the same model and mixres on every node")
        self.on_error, self.lock_text = on_error, lock_text
        self.runner = _Runner(enc, settings.pool, settings.max_batch_tokens, settings.torch_store_dtype,
                              on_error, log=lambda msg: print(f"mixres embed: {msg}", file=sys.stderr))
        self.journal = self.root / f"progress-rray-{uuid.uuid4().hex[:12]}.jsonl"
        self.kill_point, self.written = kill_point, 0
        self.ready_at = time.time()  # the model is loaded: the clock of the summary starts here

    def __call__(self, row: dict) -> dict:
        if (self.root / LOCK_NAME).read_text() != self.lock_text:  # our driver died; another run owns it
            raise RuntimeError(f"{self.root} is now written by another run; this encoder stops")
        items, errors = pickle.loads(row["info"])
        item = {"shard": int(row["shard"]), "items": items, "errors": errors,
                "patches": torch.from_numpy(np.array(row["patches"], dtype=np.float32)),
                "grid_hw": torch.from_numpy(np.array(row["grid_hw"], dtype=np.int64)).reshape(-1, 2)}
        try:
            c = finish_shard(self.root, self.source, item, self.runner, self.settings, self.journal,
                             self.on_error)
        except ValueError as e:  # --on-error fail: the driver raises it
            return {"shard": item["shard"], "images": 0, "tokens": 0, "errors": 0, "shards": 0,
                    "failed": str(e), "ready_at": self.ready_at}
        self.written += 1
        if self.kill_point and self.written == self.kill_point[0]:
            os.kill(self.kill_point[1], signal.SIGKILL)
            while True:
                time.sleep(1)
        return {"shard": item["shard"], **c, "failed": "", "ready_at": self.ready_at}


# the driver

def start_ray(ray, address: str | None):
    """Connect to `address` (auto, ray://..., host:port) or start a local Ray; True if we started it."""
    if ray.is_initialized():
        return False  # the caller's own session (library use): leave it running
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    if address is None:
        ray.init(address="local", num_cpus=os.cpu_count() or 1, **kw)
    else:
        ray.init(address=address, **kw)
    return True


def embed_ray(inputs, out, model, *, backend, select_layer, pool, min_image_tokens, max_image_tokens,
              max_pixels, max_batch_tokens, device, dtype, store_dtype, shard_size, on_error, limit,
              progress, model_name, image_column, id_column, write_tokens, ray_address=None,
              ray_actors=None, ray_cpus_per_decode=1.0, ray_cpus_per_actor=1, decode="pil") -> dict:
    """`mixres.embed.embed(..., engine="ray")` (arguments already checked there)."""
    ray = import_ray()
    if ray_actors is not None and ray_actors < 1:
        raise ValueError(f"--ray-actors must be >= 1, got {ray_actors}")
    if ray_cpus_per_decode <= 0:
        raise ValueError(f"--ray-cpus-per-decode must be > 0, got {ray_cpus_per_decode}")
    if ray_cpus_per_actor < 1:
        raise ValueError(f"--ray-cpus-per-actor must be >= 1, got {ray_cpus_per_actor}")
    t_start = time.perf_counter()
    root = Path(out)
    lock = FolderLock(root).acquire()
    started = False
    try:
        source = open_source(inputs, image_column=image_column, id_column=id_column, limit=limit)
        enc_kwargs = dict(backend=backend, select_layer=select_layer, min_image_tokens=min_image_tokens,
                          max_image_tokens=max_image_tokens, max_batch_tokens="auto", dtype=dtype)
        enc = make_encoder(model, device="cpu", **enc_kwargs)  # the settings; the actors load their own
        settings = run_settings(enc, model, model_name, pool=pool, decode=decode,
                                min_image_tokens=min_image_tokens, max_image_tokens=max_image_tokens,
                                max_pixels=max_pixels, max_batch_tokens=max_batch_tokens,
                                store_dtype=store_dtype, shard_size=shard_size, write_tokens=write_tokens)
        del enc
        prepare_out_dir(root, settings, source.keys, source.describe())
        done = done_shards(root)
        n_shards = -(-len(source.keys) // shard_size)
        pending = [s for s in range(n_shards) if s not in done]
        counts = {"images": 0, "tokens": 0, "errors": 0, "shards": 0}
        t0 = time.time()
        n_actors = 0
        if pending:
            started = start_ray(ray, ray_address)
            t0 = time.time()
            try:
                n_actors, ready = _run(ray, root, source, model, settings, enc_kwargs, pending, counts,
                                       device=device, on_error=on_error, actors=ray_actors,
                                       cpus_per_decode=ray_cpus_per_decode, cpus_per_actor=ray_cpus_per_actor,
                                       progress=progress, lock_text=(root / LOCK_NAME).read_text())
                # like the local engine: from the first loaded model on, not Ray's or the actors' start
                t0 = max(t0, ready)
            except BaseException:
                rows, errs = merge_index(root)  # keep index.jsonl in step with what is durable
                finish_meta(root, complete=False, rows=rows, errors=errs)
                raise
        t_enc = max(time.time() - t0, 1e-9)
        rows, errs = merge_index(root)
        finish_meta(root, complete=True, rows=rows, errors=errs)
        return {"inputs": len(source.keys), "done_before": len(done), **counts, "encode_seconds": t_enc,
                "images_per_s": counts["images"] / t_enc, "tokens_per_s": counts["tokens"] / t_enc,
                "out": str(root), "index_rows": rows, "index_errors": errs, "engine": "ray",
                "ray_actors": n_actors, "wall_seconds": time.perf_counter() - t_start}
    finally:
        if started:
            ray.shutdown()
        lock.release()


def _run(ray, root, source, model, settings, enc_kwargs, pending, counts, *, device, on_error, actors,
         cpus_per_decode, cpus_per_actor, progress, lock_text) -> tuple[int, float]:
    """Stream the pending shards through decode tasks and encoder actors; returns the actor
    count and the (wall-clock) time the first actor had its model loaded."""
    from tqdm import tqdm

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = (gpus > 0 and device is None) or (device is not None and str(device).startswith("cuda"))
    if use_gpu and gpus == 0:
        raise ValueError(f"--device {device}: the Ray cluster has no GPUs")
    n_actors = actors or (gpus if use_gpu else 1)
    if isinstance(model, (str, os.PathLike)):
        model_arg = os.fspath(model)
    else:
        model_arg = ray.put(model)  # an nn.Module or Encoder: shipped once through the object store
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's would count blocks
    ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=min(len(pending), 10_000))
    with warnings.catch_warnings():
        # Ray 2.6x deprecates **ray_remote_args and ray_remote_args_fn alike with no named
        # replacement for max_retries / max_restarts yet; we set them explicitly on purpose
        warnings.filterwarnings("ignore", message=".*ray_remote_args", category=DeprecationWarning)
        ds = ds.map(_decode, fn_kwargs={"source": source, "prep": make_prep(settings),
                                        "shard_size": settings.shard_size},
                    num_cpus=cpus_per_decode, max_retries=MAX_RETRIES)
        ds = ds.map(_EncoderActor, fn_constructor_kwargs={
            "root": str(root.resolve()), "model": model_arg, "source": source, "settings": settings,
            "enc_kwargs": enc_kwargs, "device": "cuda" if use_gpu else "cpu", "on_error": on_error,
            "lock_text": lock_text, "threads": cpus_per_actor, "kill_point": _test_kill_point()},
            compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=cpus_per_actor,
            num_gpus=1 if use_gpu else 0, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
    n = len(source.keys)
    total = sum(min((s + 1) * settings.shard_size, n) - s * settings.shard_size for s in pending)
    bar = tqdm(total=total, unit="img", desc="embed (ray)", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    t0, ready = time.perf_counter(), float("inf")
    rows = _rows(ray, ds)
    try:
        for row in rows:
            if row["failed"]:
                raise ValueError(row["failed"])
            for k in counts:
                counts[k] += int(row[k])
            ready = min(ready, float(row["ready_at"]))
            bar.update(int(row["images"]) + int(row["errors"]))
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{counts['images'] / dt:.1f} img/s, {counts['errors']} errors",
                                refresh=False)
    finally:
        rows.close()  # stop the stream now (an early raise), while Ray is still up
        bar.close()
    return n_actors, (ready if ready < float("inf") else time.time())


def _rows(ray, ds):
    """The summary rows; a failure Ray gave up on (retries spent, an actor that cannot start)
    becomes one line: the last line of Ray's report is the worker's own exception."""
    try:
        yield from ds.iter_rows()
    except ray.exceptions.RayError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise RuntimeError(f"the Ray engine stopped: {lines[-1] if lines else type(e).__name__}") from None
