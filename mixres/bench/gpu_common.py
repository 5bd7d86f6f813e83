"""What every section of `mixres bench gpu` shares: its `Context`, `Skip` and `needs`.

A module of its own so the section modules (gpu_checks, gpu_invariance, gpu_speed,
gpu_vlm) and the command that runs them (gpu.py) import it, not each other.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Skip", "TimeBudget", "Context", "needs"]


class Skip(Exception):
    """Raised by a section that cannot run here: `Skip("needs CUDA")`."""


@dataclass
class TimeBudget:
    seconds: float
    start: float = field(default_factory=time.perf_counter)

    @property
    def used(self) -> float:
        return time.perf_counter() - self.start

    def exhausted(self) -> bool:
        return self.used >= self.seconds


@dataclass
class Context:
    """What a section gets: the run's settings and its own time budget."""

    smoke: bool
    device: torch.device
    out: Path
    budget: TimeBudget
    notes: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The fast dtype: bf16 on CUDA, fp32 on the CPU."""
        return torch.bfloat16 if self.cuda else torch.float32

    def stop(self, what: str, left: int) -> bool:
        """True (and a note) when the budget is used: the caller leaves the rest out."""
        if not self.budget.exhausted():
            return False
        self.notes.append(f"time budget of {self.budget.seconds:.0f} s used after "
                          f"{self.budget.used:.0f} s: {left} {what} left out")
        return True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        """Peak CUDA memory since reset_peak; None on the CPU (not measured there)."""
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None


def needs(*modules: str) -> None:
    """Skip the section unless every module is importable."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip("needs " + ", ".join(m.replace("_", "-") for m in missing))
