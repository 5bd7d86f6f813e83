"""torchrun membership for embed and training: one small type, kept out of the models.

`init_distributed(device)` joins the process group when torchrun started this process
(WORLD_SIZE > 1; NCCL on CUDA, gloo on CPU) and picks this rank's device; a plain run
gets a one-rank `DistInfo` whose collectives are no-ops. Models never see it: embed
splits shards by rank, training wraps the model from outside (`vlm/training/parallel.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["DistInfo", "init_distributed"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False          # we initialized the process group (and tear it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _reduce_device(self) -> torch.device:
        # gloo reduces CPU tensors, NCCL device tensors
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier(device_ids=[self.device.index or 0] if self.device.type == "cuda" else None)

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce(self, values: list[float], op: str = "SUM") -> list[float]:
        """Element-wise SUM / MAX / MIN over ranks, in float64."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick the device of this rank.

    device None: CUDA when available (this rank's local GPU), else the CPU. A CUDA device
    without an index becomes this rank's local GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    import torch.distributed as dist
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():  # ours, or one the caller set up
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, owns)
    return DistInfo(device=dev)
