"""The Ray engine (`mixres embed --engine ray`): the same folder as the local engine, on Ray Data.

    pending shards --from_items--> decode (CPU tasks) --> encode (actors) --> driver
    one item = one whole shard   SliceDataset's decode   model loaded once    summary rows
                                 patches as numpy arrays  per actor; a
                                                          ShardWriter writes
                                                          and journals

The driver (`mixres.embed.driver`) has taken the folder's lock, listed the source, checked
the settings, repaired what a crash left and planned the pending shards; this engine only
streams them. Each encoder actor writes with the local engine's own `ShardWriter` into a
journal of its own (progress-rray-<id>.jsonl, a new id per actor start, so a restarted actor
never appends after a torn line). A shard is a function of the inputs alone, so a retried
task that writes a shard twice writes the same bytes, and `merge_index` keeps one record.

A killed driver resumes like a local run: rerun the same command. Its actors belong to its
Ray job and die with it; one still writing when a new run starts sees that the lock file
names another run and stops before its next shard.

On a cluster, --out must be a folder every node sees (a shared filesystem), and mixres must
be importable on every node.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mixres.distributed import DistInfo
from mixres.embed.config import EmbedConfig
from mixres.embed.engines import ENGINES
from mixres.embed.lock import LOCK_NAME
from mixres.embed.shards import Job, ShardWriter, decode_shard, make_prep
from mixres.embed.state import RunSettings
from mixres.encoders import make_encoder

__all__ = ["RayEngine", "import_ray", "start_ray"]

INSTALL_HINT = "--engine ray needs Ray Data: pip install 'mixres[ray]' (or pip install 'ray[data]')"
MAX_RETRIES = 3  # decode tasks and encoder actors: Ray retries a failed task / restarts a dead actor


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


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


# the workers

def _decode(row: dict, source, prep, shard_size: int) -> dict:
    """A decode task: one whole shard -> its patches and grids as numpy arrays."""
    item = decode_shard(source, int(row["shard"]), prep, shard_size)
    return {"shard": item["shard"], "patches": item["patches"].numpy(),
            "grid_hw": item["grid_hw"].numpy(),
            "info": pickle.dumps((item["items"], item["errors"]))}


class _EncoderActor:
    """Holds the model (loaded once) and writes whole shards into its own journal."""

    def __init__(self, root: str, model, source, settings: RunSettings, schema, device: str,
                 lock_text: str, threads: int, hooks: list):
        if device == "cpu":  # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch may have read another
            torch.set_num_threads(threads)
            # an actor is a process of its own, started for this run: as the command line does
            from mixres.allocator import keep_freed_memory
            keep_freed_memory()
        self.root = Path(root)
        if not (self.root / "meta.json").is_file():
            raise ValueError(f"--out {root} is not visible on this Ray node; on a cluster give a folder "
                             "on a filesystem every node shares")
        if not isinstance(model, (str, os.PathLike, nn.Module)):  # an ObjectRef of a module or Encoder
            import ray

            model = ray.get(model)
        c = settings.config
        enc = make_encoder(model, backend=c.backend, select_layer=c.select_layer,
                           min_image_tokens=c.min_image_tokens, max_image_tokens=c.max_image_tokens,
                           max_batch_tokens=c.max_batch_tokens, dtype=c.dtype, device=device)
        if RunSettings.of(c, enc, model).fingerprint() != settings.fingerprint():
            raise ValueError(f"the model on this Ray node ({settings.facts.model}) gives other settings "
                             "than on the driver; install the same model and mixres on every node")
        self.lock_text = lock_text
        self.writer = ShardWriter(self.root, source, settings, schema, enc,
                                  self.root / f"progress-rray-{uuid.uuid4().hex[:12]}.jsonl", c.on_error,
                                  log=lambda msg: print(f"mixres embed: {msg}", file=sys.stderr), hooks=hooks)
        self.ready_at = time.time()  # the model is loaded: the stream's clock starts here

    def __call__(self, row: dict) -> dict:
        if (self.root / LOCK_NAME).read_text() != self.lock_text:  # our driver died; another run owns it
            raise RuntimeError(f"{self.root} is now written by another run; this encoder stops")
        items, errors = pickle.loads(row["info"])
        item = {"shard": int(row["shard"]), "items": items, "errors": errors,
                "patches": torch.from_numpy(np.array(row["patches"], dtype=np.float32)),
                "grid_hw": torch.from_numpy(np.array(row["grid_hw"], dtype=np.int64)).reshape(-1, 2)}
        before = self.writer.encoder_seconds
        try:
            c = self.writer.write(item)
        except ValueError as e:  # --on-error fail, or the folder cannot be written: the driver raises it
            return {"shard": item["shard"], "images": 0, "tokens": 0, "errors": 0, "shards": 0,
                    "encoder_seconds": 0.0, "failed": str(e), "ready_at": self.ready_at}
        return {"shard": item["shard"], **c, "encoder_seconds": self.writer.encoder_seconds - before,
                "failed": "", "ready_at": self.ready_at}


# the engine

@ENGINES.register("ray")
class RayEngine:
    def __init__(self, config: EmbedConfig):
        self.config, self.ray, self.started = config, import_ray(), False  # no Ray: one line, before any work

    def start(self) -> DistInfo:
        return DistInfo()  # one driver process; the actors are Ray's

    def device(self, group: DistInfo):
        return "cpu"  # the driver's encoder only gives the settings; the actors load their own

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False

    def run(self, job: Job) -> dict:
        counts = {"images": 0, "tokens": 0, "errors": 0, "shards": 0, "encoder_seconds": 0.0}
        if not job.shards:
            return {**counts, "encoders": 0, "stream_seconds": 0.0}
        self.started = start_ray(self.ray, self.config.ray_address)
        n_actors, ready = _run(self.ray, job, counts, self.config)
        return {**counts, "encoders": n_actors, "stream_seconds": time.time() - ready}


def _run(ray, job: Job, counts: dict, config: EmbedConfig) -> tuple[int, float]:
    """Stream the pending shards through decode tasks and encoder actors; returns the actor
    count and the (wall-clock) time the first actor had its model loaded."""
    from tqdm import tqdm

    device = config.device
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = (gpus > 0 and device is None) or (device is not None and str(device).startswith("cuda"))
    if use_gpu and gpus == 0:
        raise ValueError(f"--device {device}: the Ray cluster has no GPUs")
    n_actors = config.ray_actors or (gpus if use_gpu else 1)
    model = job.model
    # an nn.Module or Encoder is shipped once through the object store
    model_arg = os.fspath(model) if isinstance(model, (str, os.PathLike)) else ray.put(model)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts images; Ray's would count blocks
    pending = job.shards
    ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=min(len(pending), 10_000))
    with warnings.catch_warnings():
        # Ray 2.6x deprecates **ray_remote_args and ray_remote_args_fn alike with no named
        # replacement for max_retries / max_restarts yet; we set them explicitly on purpose
        warnings.filterwarnings("ignore", message=".*ray_remote_args", category=DeprecationWarning)
        ds = ds.map(_decode, fn_kwargs={"source": job.source, "prep": make_prep(job.settings),
                                        "shard_size": job.settings.config.shard_size},
                    num_cpus=config.ray_cpus_per_decode, max_retries=MAX_RETRIES)
        ds = ds.map(_EncoderActor, fn_constructor_kwargs={
            "root": str(job.root.resolve()), "model": model_arg, "source": job.source,
            "settings": job.settings, "schema": job.schema, "device": "cuda" if use_gpu else "cpu",
            "lock_text": job.lock_text, "threads": config.ray_cpus_per_actor, "hooks": job.hooks},
            compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=config.ray_cpus_per_actor,
            num_gpus=1 if use_gpu else 0, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
    bar = tqdm(total=job.num_inputs, unit="img", desc="embed (ray)", disable=not job.progress,
               dynamic_ncols=True, file=sys.stderr)
    t0, ready = time.perf_counter(), float("inf")
    rows = _rows(ray, ds)
    try:
        for row in rows:
            if row["failed"]:
                raise ValueError(row["failed"])
            for k in counts:
                counts[k] += type(counts[k])(row[k])
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
