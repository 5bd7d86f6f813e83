"""Distribution and speed-ups applied to a VLM from outside (the model knows none of it).

Order of application follows torchtitan: activation checkpointing, then torch.compile,
then data parallelism (DDP, or FSDP2 `fully_shard` on every repeated block and the root).

Under torchrun (WORLD_SIZE > 1) `init_distributed` joins the process group (NCCL on
CUDA, gloo on CPU). Gradients are summed over ranks by scaling the loss by the world
size (DDP and FSDP average), so that the loss of a step is sum over tokens / global
token count whatever the number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "init_distributed", "repeated_blocks", "apply_activation_checkpointing",
           "apply_compile", "wrap_data_parallel", "all_reduce_sum", "gather_objects"]


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


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick the device of this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device(device or "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, owns)
    return DistInfo(0, 1, 0, dev, False)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the LM and the encoder: children of every ModuleList of
    at least two modules (what FSDP shards and checkpointing recomputes one by one)."""
    blocks, taken = [], set()
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and id(mod) not in taken:
            inner = [m for m in mod if sum(p.numel() for p in m.parameters())]
            if any(id(b) in taken for b in inner):
                continue
            for b in inner:
                blocks.append(b)
                taken.update(id(m) for m in b.modules())
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward (non-reentrant); returns how many."""
    from torch.distributed._composable import checkpoint

    blocks = repeated_blocks(model)
    for b in blocks:
        checkpoint(b)
    return len(blocks)


def apply_compile(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile each block in place (names and state-dict keys unchanged)."""
    blocks = repeated_blocks(model)
    for b in blocks:
        b.compile(backend=backend, dynamic=True)
    return len(blocks)


def wrap_data_parallel(model: nn.Module, info: DistInfo, how: str, trainable: set[str]):
    """DDP or FSDP2 around `model`; returns the module to call.

    `trainable`: names of every parameter that trains in some freeze stage. They are marked
    trainable while wrapping so DDP syncs them all; a stage's frozen parameters then just
    get no gradient (find_unused_parameters) and the loop drops any grad they receive.
    """
    if not info.distributed:
        return model
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids, find_unused_parameters=True)
    elif how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for b in repeated_blocks(model):
            fully_shard(b)
        wrapped = fully_shard(model)
    else:
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {how!r}")
    # FSDP2 swaps in sharded parameters: restore the flags by name
    for n, p in model.named_parameters():
        p.requires_grad_(saved[n])
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The VLM inside a DDP wrapper (FSDP2 and compile keep the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum over ranks (float64 on CPU for gloo, on the device for NCCL)."""
    if not info.distributed:
        return [float(v) for v in values]
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
