"""Evaluation of a training run on its held-out set: loss and content accuracy, all ranks together."""

from __future__ import annotations

import torch

from mixres.packing import pack_into_bins
from mixres.vlm.training.data import Collate, loader, num_targets
from mixres.vlm.training.metrics import content_hits
from mixres.vlm.training.step import autocast

__all__ = ["evaluate", "WORD_SLOTS"]

WORD_SLOTS = 3  # per-word accuracy of the first words (synthetic: colour, shape, position)


@torch.no_grad()
def evaluate(model, vlm, ds, lengths, max_batch_tokens, info, *, bf16: bool = False,
             workers: int = 0) -> dict:
    """eval_loss (mean over trained tokens), content_accuracy and accuracy_by_word over `ds`."""
    bins = pack_into_bins(lengths, max_batch_tokens)
    w = info.world_size
    # every rank runs the same number of forwards (FSDP needs it); fillers count zero
    while len(bins) % w:
        bins.append([])
    mine = bins[info.rank::w]
    batches = loader(ds, [b or bins[0] for b in mine], Collate(vlm.collator), workers)
    model.eval()
    loss_sum = count = correct = words = 0.0
    slots: dict[int, list[int]] = {}
    for (batch, meta), b in zip(batches, mine):
        with autocast(bf16, info.device):
            out = model(batch)
        if not b:
            continue
        n = num_targets(batch)
        if out.loss is not None:
            loss_sum += float(out.loss) * n
        count += n
        c, t = content_hits(batch, out.logits.float(), meta, vlm.tokenizer, by_slot=slots)
        correct, words = correct + c, words + t
    model.train()
    flat = [v for k in range(WORD_SLOTS) for v in slots.get(k, [0, 0])]
    loss_sum, count, correct, words, *flat = info.all_reduce([loss_sum, count, correct, words, *flat])
    res = {"eval_loss": loss_sum / max(count, 1),
           "content_accuracy": correct / words if words else None, "eval_samples": len(ds)}
    if any(flat[1::2]):
        res["accuracy_by_word"] = [flat[2 * k] / max(flat[2 * k + 1], 1) for k in range(WORD_SLOTS)]
    return res
