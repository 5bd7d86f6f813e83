"""The local engine: DataLoader workers decode whole shards while this process encodes.

Under `torchrun --nproc_per_node K -m mixres embed ...` each rank runs the driver and this
engine on every K-th pending shard, into its own journal (progress-r{rank}.jsonl).
"""

from __future__ import annotations

import sys
import time

import torch

from mixres.distributed import DistInfo, init_distributed
from mixres.embed.config import EmbedConfig
from mixres.embed.engines import ENGINES
from mixres.embed.inputs import SliceDataset, join_slices, plan_slices
from mixres.embed.shards import SLICE_SIZE, Job, ShardWriter, make_prep

__all__ = ["LocalEngine"]


@ENGINES.register("local")
class LocalEngine:
    def __init__(self, config: EmbedConfig):
        self.config = config
        # CUDA cannot run in forked DataLoader workers
        self.workers = 0 if config.decode == "cuda" else max(0, config.num_workers)

    def start(self) -> DistInfo:
        return init_distributed(self.config.device)

    def device(self, group: DistInfo):
        return group.device

    def close(self) -> None:
        pass

    def run(self, job: Job) -> dict:
        from tqdm import tqdm

        c = job.settings.config
        n = len(job.source.keys)
        slices = plan_slices(job.shards, n, c.shard_size, SLICE_SIZE)
        w = self.workers
        # about one shard of images in flight, so workers keep decoding while the device encodes
        prefetch = max(2, -(-c.shard_size // (SLICE_SIZE * w))) if w else None
        loader = torch.utils.data.DataLoader(
            SliceDataset(job.source, slices, make_prep(job.settings)), batch_size=None, shuffle=False,
            num_workers=w, pin_memory=job.enc.device.type == "cuda", prefetch_factor=prefetch)
        bar = tqdm(total=job.num_inputs, unit="img", desc="embed", disable=not job.progress,
                   dynamic_ncols=True, file=sys.stderr)
        writer = ShardWriter(job.root, job.source, job.settings, job.schema, job.enc,
                             job.root / f"progress-r{job.rank}.jsonl", c.on_error,
                             log=lambda msg: bar.write(f"mixres embed: {msg}", file=sys.stderr),
                             hooks=job.hooks)
        counts = {"images": 0, "tokens": 0, "errors": 0, "shards": 0}
        t0 = time.perf_counter()
        try:
            for item in _whole_shards(loader, c.shard_size, n, c.on_error):
                got = writer.write(item)
                for k in counts:
                    counts[k] += got[k]
                bar.update(got["images"] + got["errors"])
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{counts['images'] / dt:.1f} img/s, {counts['errors']} errors",
                                    refresh=False)
        finally:
            bar.close()
        return {**counts, "encoder_seconds": writer.encoder_seconds, "encoders": 1,
                "stream_seconds": time.perf_counter() - t0}


def _whole_shards(loader, shard_size: int, num_inputs: int, on_error: str):
    """Reassemble the loader's slices into shards; under --on-error fail, stop at the first bad one."""
    parts, have = [], 0
    for part in loader:
        if on_error == "fail" and part["errors"]:
            yield part  # the writer raises on it before anything of this shard is written
        parts.append(part)
        have += len(part["items"]) + len(part["errors"])
        s = part["shard"]
        if have == min((s + 1) * shard_size, num_inputs) - s * shard_size:
            yield join_slices(parts)
            parts, have = [], 0
