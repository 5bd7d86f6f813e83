"""What the trainer reads: the run's datasets, each sample's token count, and the loaders.

A training dataset is anything with `__len__`, `__getitem__(i) -> item`,
`image_sizes(i) -> [(height, width), ...]` (read without decoding) and `text_of(i)` (the
item's text fields, without loading or rendering its images), so token budgets are
planned before any pixel is touched. Two sources are built in and chosen by the [data]
table (`SOURCES`): a JSONL manifest (mixres.vlm.training.manifest) or the synthetic
shapes task (mixres.vlm.training.synthetic).
"""

from __future__ import annotations

from collections import deque

from torch.utils.data import DataLoader

from mixres.vlm.layout import target_mask
from mixres.vlm.training import manifest, synthetic
from mixres.vlm.training.config import RunConfig
from mixres.vlm.training.sampler import TokenBudgetSampler

__all__ = ["SOURCES", "datasets", "sample_length", "lengths", "Collate", "StepBins", "loader",
           "num_targets", "num_tokens"]

# [data] source -> datasets(cfg) -> (train, eval or None)
SOURCES = {"synthetic": synthetic.datasets, "manifest": manifest.datasets}


def datasets(cfg: RunConfig):
    """(train, eval or None) as the [data] table says."""
    return SOURCES["synthetic" if cfg.data.synthetic else "manifest"](cfg)


def sample_length(vlm, item: dict, sizes: list[tuple[int, int]]) -> int:
    """Image + text tokens one sample brings, from image sizes alone (nothing decoded)."""
    return vlm.collator.length_from_sizes(item, sizes)


def lengths(vlm, ds) -> list[int]:
    return [sample_length(vlm, ds.text_of(i), ds.image_sizes(i)) for i in range(len(ds))]


class Collate:
    """Items -> (VLMBatch, meta) in a DataLoader worker: images are loaded and resized here."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        batch = self.collator([{k: v for k, v in it.items() if k != "content_spans"} for it in items])
        meta = [{"response": it.get("response", it.get("text", "")),
                 "content_spans": it.get("content_spans")} for it in items]
        return batch, meta


class StepBins:
    """The batch sampler a DataLoader reads: this rank's bins from (epoch, step) on.

    The sampler is iterated here only; the (epoch, step) of every bin handed to the
    loader waits in `positions` until its batch comes out (the loader keeps the order,
    however far its workers prefetch), so the trainer knows where the data order stands.
    """

    def __init__(self, sampler: TokenBudgetSampler, epoch: int, step: int):
        self.sampler, self.epoch, self.step = sampler, epoch, step
        self.positions: deque[tuple[int, int]] = deque()

    def __iter__(self):
        for e, s, b in self.sampler.iterate(self.epoch, self.step):
            self.positions.append((e, s))
            yield b


def loader(ds, batch_sampler, collate, workers: int) -> DataLoader:
    return DataLoader(ds, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def num_targets(batch) -> int:
    if batch.labels is None:
        return 0
    return int(target_mask(batch.labels, batch.position_ids).sum())


def num_tokens(batch) -> int:
    extra = 0 if batch.image_positions.numel() else sum(batch.image_token_counts)
    return batch.num_tokens + extra
