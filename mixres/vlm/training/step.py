"""One optimizer step of training: the micro-batches of every rank, one update.

The loss of a step is

    sum over every trained token of every rank's bins  /  global count of trained tokens

so 1 process with accum A*W and W processes with accum A compute the same loss and the
same update (the global batch is the union of the ranks' bins). Then gradient clipping
and the optimizer and schedule steps; parameters of a frozen stage never move.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from mixres.vlm.training.data import num_targets, num_tokens

__all__ = ["StepResult", "use_bf16", "autocast", "train_step"]


@dataclass
class StepResult:
    """What one step did, summed over all ranks (loss: per trained token)."""

    loss: float
    tokens: float
    images: float
    grad_norm: float


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or "auto" on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(bf16: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _sync(model, last: bool):
    """Skip gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _micro_loss(model, batch, bf16: bool, device):
    """Sum of the token cross-entropies of one bin (a graph; 0 * logits when nothing trains)."""
    with autocast(bf16, device):
        out = model(batch)
    if out.loss is None:
        return out.logits.sum() * 0.0
    return out.loss * num_targets(batch)


def _grad_norm(params, clip):
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def train_step(model, vlm, optimizer, scheduler, batches: list, info, *, bf16: bool,
               grad_clip: float | None) -> StepResult:
    """Forward and backward over this rank's micro-batches `batches`, then one update.

    model: what to call (the VLM, or its DDP / FSDP2 wrapper); vlm: the VLM itself.
    """
    global_count = max(info.all_reduce([sum(num_targets(b) for b in batches)])[0], 1.0)
    loss_sum = 0.0
    for a, batch in enumerate(batches):
        with _sync(model, a == len(batches) - 1):
            lsum = _micro_loss(model, batch, bf16, info.device)
            (lsum * (info.world_size / global_count)).backward()
        loss_sum += float(lsum.detach())
    trainable = []
    for p in vlm.parameters():
        if p.requires_grad:
            trainable.append(p)
        else:
            p.grad = None  # a frozen stage's parameter must not move, not even by decay
    gnorm = _grad_norm(trainable, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(num_tokens(b) for b in batches)
    images = sum(len(b.image_token_counts) for b in batches)
    loss_sum, tokens, images = info.all_reduce([loss_sum, tokens, images])
    return StepResult(loss_sum / global_count, tokens, images, gnorm)
