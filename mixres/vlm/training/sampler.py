"""Token-budget batches for training: full bins, shuffled, sharded by rank, resumable.

A bin is one micro-batch: samples whose tokens (image + text) fit `max_batch_tokens`, packed by
`mixres.packing.pack_into_bins` (first-fit decreasing). First-fit decreasing sorts by
length, so packing a whole epoch at once would give the same bins every epoch and put
all long samples together. Instead each epoch

  1. permutes the samples (seeded by seed and epoch),
  2. packs them chunk by chunk (`chunk_bins` budgets' worth of samples per chunk), and
     carries the samples of a chunk's under-full bins (fill < `min_fill`) into the next
     chunk, so bins stay full and the epoch's order stays random,
  3. shuffles the bins, and keeps a multiple of `world_size * accum` of them.

A global step takes the next `world_size * accum` bins G[0..W*A): rank r runs
G[a * W + r] as its micro-batch a. So 1 process with accum 2 and 2 processes with
accum 1 see exactly the same samples per step (the union of the ranks' bins), which is
what makes their losses comparable.

The order is a pure function of (seed, epoch), so the data-order state of a run is just
(epoch, step within the epoch): `epoch_bins(e)[step * W * A:]` is where a resumed run
continues.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mixres.packing import pack_into_bins

__all__ = ["TokenBudgetSampler"]


class TokenBudgetSampler:
    """Bins of sample indices for one rank, step by step.

    lengths     tokens per sample (image tokens + text tokens)
    max_batch_tokens  budget of one micro-batch (one bin)
    """

    def __init__(self, lengths: Sequence[int], max_batch_tokens: int, *, seed: int = 0, shuffle: bool = True,
                 world_size: int = 1, rank: int = 0, accum: int = 1, chunk_bins: int = 16,
                 min_fill: float = 0.9):
        self.lengths = [int(n) for n in lengths]
        if not self.lengths:
            raise ValueError("TokenBudgetSampler: no samples")
        if max_batch_tokens < 1:
            raise ValueError(f"TokenBudgetSampler: max_batch_tokens must be positive, got {max_batch_tokens}")
        if not 0 <= rank < world_size:
            raise ValueError(f"TokenBudgetSampler: rank {rank} outside world size {world_size}")
        self.max_batch_tokens, self.seed, self.shuffle = int(max_batch_tokens), int(seed), shuffle
        self.world_size, self.rank, self.accum = int(world_size), int(rank), int(accum)
        self.chunk_bins, self.min_fill = int(chunk_bins), float(min_fill)
        if self.steps_per_epoch(0) < 1:
            raise ValueError(f"TokenBudgetSampler: {len(self.lengths)} samples "
                             f"({sum(self.lengths)} tokens) make fewer than world_size * accum = "
                             f"{self.group} bins of {self.max_batch_tokens} tokens; lower max_batch_tokens")

    @property
    def group(self) -> int:
        """Bins per global step."""
        return self.world_size * self.accum

    def epoch_bins(self, epoch: int) -> list[list[int]]:
        """All bins of an epoch in order (the same on every rank), trimmed to whole steps."""
        n = len(self.lengths)
        if not self.shuffle:
            bins = pack_into_bins(self.lengths, self.max_batch_tokens)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n).tolist()
            mean = max(1.0, sum(self.lengths) / n)
            chunk = max(1, int(self.chunk_bins * self.max_batch_tokens / mean))
            bins, carry = [], []
            for start in range(0, n, chunk):
                items = carry + order[start:start + chunk]
                last = start + chunk >= n
                packed = pack_into_bins([self.lengths[i] for i in items], self.max_batch_tokens)
                carry = []
                for b in packed:
                    fill = sum(self.lengths[items[j]] for j in b) / self.max_batch_tokens
                    if fill < self.min_fill and not last:
                        carry.extend(items[j] for j in b)
                    else:
                        bins.append([items[j] for j in b])
            bins = [bins[i] for i in rng.permutation(len(bins)).tolist()]
        keep = len(bins) // self.group * self.group
        return bins[:keep]

    def steps_per_epoch(self, epoch: int) -> int:
        return len(self.epoch_bins(epoch)) // self.group

    def step_bins(self, epoch: int, step: int, bins: list[list[int]] | None = None) -> list[list[int]]:
        """This rank's micro-batches (accum of them) of global step `step` of `epoch`."""
        bins = self.epoch_bins(epoch) if bins is None else bins
        g = bins[step * self.group:(step + 1) * self.group]
        return [g[a * self.world_size + self.rank] for a in range(self.accum)]

    def iterate(self, epoch: int = 0, step: int = 0) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, step, bin) for every micro-batch of this rank, from (epoch, step) on, forever."""
        while True:
            bins = self.epoch_bins(epoch)
            for s in range(step, len(bins) // self.group):
                for b in self.step_bins(epoch, s, bins):
                    yield epoch, s, b
            epoch, step = epoch + 1, 0

    def fill(self, epoch: int = 0) -> float:
        """Mean fraction of the budget used by the bins of an epoch."""
        bins = self.epoch_bins(epoch)
        return sum(sum(self.lengths[i] for i in b) for b in bins) / (len(bins) * self.max_batch_tokens)
