"""Optimizer, learning-rate schedule and staged freezing for VLM training.

- AdamW with two parameter groups: weight decay on matrices, none on norms, biases,
  gates (every parameter with fewer than 2 dims) and embeddings (token and position
  tables: decaying them pulls rare tokens to zero). Every parameter is in a group
  whether or not it trains now, so staged unfreezing needs no new optimizer; AdamW
  skips parameters whose grad is None.
- Linear warm-up then cosine decay to `min_lr_ratio * lr` (a LambdaLR, whose state
  dict is just the step count).
- Freeze stages: [{"until": 100, "train": ["adapter"]}, {"train": ["adapter", "lm"]}]
  — each stage names the parameter prefixes that train until (excluding) step `until`;
  the last stage may leave `until` out. A prefix must match some parameter name, or
  the error lists the top-level modules there are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "warmup_cosine", "schedule_factor", "FreezeStages"]

_DENSE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{decayed params}, {norms, biases, gates, embeddings}] with their names.

    Embeddings: nn.Embedding tables, and parameters held directly by a module that is
    not a Linear/Conv whose name mentions "embed" or "token" (ViT position tables, CLS
    and register tokens).
    """
    decay, no_decay, seen = [], [], set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights appear once
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, nn.Embedding):
                skip = True
            elif isinstance(mod, _DENSE):
                skip = p.ndim < 2
            else:
                skip = p.ndim < 2 or any(w in name.lower() for w in ("embed", "token"))
            (no_decay if skip else decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    for g in groups:
        g.pop("names")
    # foreach=False: the same kernels for every parameter layout (plain, DDP, FSDP DTensor),
    # so a 1-process and a 2-process run update identically
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=False)


def schedule_factor(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """The learning-rate multiplier at `step`: linear warm-up, then cosine to min_lr_ratio."""
    total_steps, warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1):
    """LambdaLR: lr * step/warmup for the warm-up, then cosine from lr to min_lr_ratio * lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(step, total_steps, warmup_steps, min_lr_ratio))


class FreezeStages:
    """Which parameters train at each step, from a list of stages (see module docstring).

    No stages: the model's own requires_grad flags stand. `apply(model, step)` sets
    requires_grad for the stage of `step`.
    """

    def __init__(self, stages: Sequence[dict] | None):
        self.stages = []
        prev = -1
        for i, st in enumerate(stages or []):
            if not isinstance(st, dict) or "train" not in st:
                raise ValueError(f"freeze stage {i}: expected a table with 'train' = [prefixes] "
                                 f"and an optional 'until' step, got {st!r}")
            train = st["train"]
            train = [train] if isinstance(train, str) else list(train)
            until = st.get("until")
            if until is None and i != len(stages) - 1:
                raise ValueError(f"freeze stage {i}: only the last stage may leave 'until' out")
            if until is not None and int(until) <= prev:
                raise ValueError(f"freeze stage {i}: 'until' = {until} must be after the previous "
                                 f"stage's ({prev})")
            prev = int(until) if until is not None else prev
            self.stages.append((None if until is None else int(until), train))
        self._current: tuple | None = None

    def prefixes_at(self, step: int) -> list[str] | None:
        """The trainable prefixes at `step` (None: everything)."""
        if not self.stages:
            return None
        for until, train in self.stages:
            if until is None or step < until:
                return train
        return self.stages[-1][1]

    def check(self, model: nn.Module) -> None:
        names = [n for n, _ in model.named_parameters()]
        for _, train in self.stages:
            for prefix in train:
                if prefix not in ("*", "all") and not any(_matches(n, prefix) for n in names):
                    tops = sorted({n.split(".")[0] for n in names})
                    raise ValueError(f"freeze stage prefix {prefix!r} matches no parameter; "
                                     f"top-level modules: {tops}")

    def ever_trainable(self, model: nn.Module) -> set[str]:
        """Names of the parameters that train in some stage (no stages: those that train now)."""
        if not self.stages:
            return {n for n, p in model.named_parameters() if p.requires_grad}
        return {n for n, _ in model.named_parameters()
                if any(_matches(n, pre) for _, train in self.stages for pre in train)}

    def apply(self, model: nn.Module, step: int) -> bool:
        """Set requires_grad for `step`; True when the trainable set changed. Without
        stages nothing is touched (the VLM config's own `freeze` stays in force)."""
        prefixes = self.prefixes_at(step)
        if prefixes is None or tuple(prefixes) == self._current:
            return False
        self._current = tuple(prefixes)
        for name, p in model.named_parameters():
            p.requires_grad_(any(_matches(name, pre) for pre in prefixes))
        return True


def _matches(name: str, prefix: str) -> bool:
    return prefix in ("*", "all") or name == prefix or name.startswith(prefix + ".")
