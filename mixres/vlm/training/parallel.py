"""Distribution and speed-ups applied to a VLM from outside (the model knows none of it).

Order of application follows torchtitan: activation checkpointing, then torch.compile,
then data parallelism (DDP, or FSDP2 `fully_shard` on every repeated block and the root).

Under torchrun (WORLD_SIZE > 1) `mixres.distributed.init_distributed` joins the process
group (NCCL on CUDA, gloo on CPU). Gradients are summed over ranks by scaling the loss by the world
size (DDP and FSDP average), so that the loss of a step is sum over tokens / global
token count whatever the number of ranks.
"""

from __future__ import annotations

from torch import nn

from mixres.distributed import DistInfo

__all__ = ["repeated_blocks", "apply_activation_checkpointing", "apply_compile", "wrap_data_parallel"]


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

