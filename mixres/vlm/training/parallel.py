"""Distribution and speed-ups applied to a VLM from outside (the model knows none of it).

Order of application follows torchtitan: activation checkpointing, then torch.compile,
then data parallelism (DDP, or FSDP2 `fully_shard` on every block and the root). The
blocks are the ones the tower and the LM name (`VLM.blocks()`), never guessed from the
module tree.

Under torchrun (WORLD_SIZE > 1) `mixres.distributed.init_distributed` joins the process
group (NCCL on CUDA, gloo on CPU). Gradients are summed over ranks by scaling the loss by the world
size (DDP and FSDP average), so that the loss of a step is sum over tokens / global
token count whatever the number of ranks. With bf16 on, FSDP2 gathers parameters in
bf16 and reduces gradients in fp32 (its mixed-precision policy); the sharded master
weights and the optimizer stay fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from mixres.distributed import DistInfo

__all__ = ["apply_activation_checkpointing", "apply_compile", "wrap_data_parallel"]


def apply_activation_checkpointing(blocks: list[nn.Module]) -> int:
    """Recompute each block's activations in backward (non-reentrant); returns how many."""
    from torch.distributed._composable import checkpoint

    for b in blocks:
        checkpoint(b)
    return len(blocks)


def apply_compile(blocks: list[nn.Module], backend: str = "inductor") -> int:
    """torch.compile each block in place (names and state-dict keys unchanged)."""
    for b in blocks:
        b.compile(backend=backend, dynamic=True)
    return len(blocks)


def wrap_data_parallel(model: nn.Module, blocks: list[nn.Module], info: DistInfo, how: str,
                       trainable: set[str], bf16: bool = False):
    """DDP or FSDP2 around `model` (FSDP2: each of `blocks`, then the root); returns the
    module to call.

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
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
                  else MixedPrecisionPolicy())
        for b in blocks:
            if next(b.parameters(), None) is not None:  # nothing to shard otherwise
                fully_shard(b, mp_policy=policy)
        wrapped = fully_shard(model, mp_policy=policy)
    else:
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {how!r}")
    # FSDP2 swaps in sharded parameters: restore the flags by name
    for n, p in model.named_parameters():
        p.requires_grad_(saved[n])
    return wrapped
