"""What a training run measures and writes: content accuracy, metrics.jsonl, the loss-curve PNG.

content accuracy (teacher forcing). For every held-out sample, each content word of its
response (a character span; for the synthetic task the colour, the shape and the
position) counts as correct when the model's argmax prediction equals the target at
every token of that word, each predicted from the image, the prompt and the true
preceding tokens. content_accuracy = correct words / all content words. A word whose
first token has no text position before it (a response right after an image block under
joint_decoder / mot, where VLMOutput.logits has no row) counts as wrong, so the number
never flatters; prompts should end with a text token ("<image>:").

metrics.jsonl holds one JSON object per line: per logged step
{"step", "loss", "lr", "tokens_per_s", "images_per_s", ...} and per evaluation
{"step", "eval_loss", "content_accuracy", ...}. Only rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mixres.vlm.layout import target_mask

__all__ = ["word_spans", "content_hits", "token_spans", "MetricsLog", "plot_losses"]


def word_spans(response: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of every word of a response: its content words when
    nothing marks them (manifests; the synthetic captions are all content)."""
    spans, pos = [], 0
    for word in response.split(" "):
        spans.append((pos, pos + len(word)))
        pos += len(word) + 1
    return spans


def token_spans(tokenizer, response: str, spans) -> list[tuple[int, int]]:
    """Character spans of the response -> token index spans [start, end), from one
    tokenization's offsets: a word's tokens are those whose characters overlap it (with a
    subword tokenizer the token of " green" covers the space before the word too)."""
    _, offsets = tokenizer.encode_with_offsets(response)
    out = []
    for a, b in spans:
        hit = [i for i, (s, e) in enumerate(offsets) if s < b and e > a and e > s]
        out.append((hit[0], hit[-1] + 1) if hit else (0, 0))
    return out


def content_hits(batch, logits: torch.Tensor, meta: list[dict], tokenizer, by_slot: dict | None = None):
    """(correct content words, content words) of one packed batch under teacher forcing.

    by_slot: if given, {k: [correct, total]} is accumulated for the k-th content word of
    each response (synthetic task: 0 colour, 1 shape, 2 position).

    batch: the VLMBatch; logits: VLMOutput.logits (T_text, V) (rows at batch.text_positions);
    meta[i]: {"response": str, "content_spans": [(start, end), ...]} of sample i.
    """
    if batch.labels is None:
        return 0, sum(len(m.get("content_spans") or []) for m in meta)
    dev = logits.device
    T = batch.input_ids.numel()
    row_of = torch.full((T,), -1, dtype=torch.long, device=dev)
    row_of[batch.text_positions.to(dev)] = torch.arange(batch.text_positions.numel(), device=dev)
    preds = logits.argmax(-1)
    labels, pos = batch.labels.to(dev), batch.position_ids.to(dev)
    cu = batch.cu_seqlens.tolist()
    correct = total = 0
    for s, m in enumerate(meta):
        spans = m.get("content_spans") or []
        if not spans:
            continue
        a, b = cu[s], cu[s + 1]
        trained = target_mask(labels[a:b], pos[a:b]).nonzero().squeeze(1) + a
        for k, (ta, tb) in enumerate(token_spans(tokenizer, m["response"], spans)):
            q = trained[ta:tb]
            rows = row_of[q - 1] if q.numel() else q
            ok = (q.numel() == tb - ta > 0 and not bool((rows < 0).any())
                  and bool((preds[rows] == labels[q]).all()))
            total += 1
            correct += int(ok)
            if by_slot is not None:
                slot = by_slot.setdefault(k, [0, 0])
                slot[0] += int(ok)
                slot[1] += 1
    return correct, total


class MetricsLog:
    """Appends JSON records to OUT/metrics.jsonl (rank 0 only; other ranks no-op)."""

    def __init__(self, out_dir, enabled: bool = True, truncate_after: int | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if truncate_after is not None and self.path.is_file():
                # a resumed run drops what the interrupted one logged after its checkpoint
                keep = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
                self.path.write_text("".join(line + "\n" for line in keep))
            elif truncate_after is None:
                self.path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], path) -> Path:
    """Training loss (and eval loss, content accuracy when present) against step, as a PNG."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    acc = [(r["step"], r["content_accuracy"]) for r in records if r.get("content_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # minor log ticks cost seconds
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "s--", color="tab:green", label="content accuracy")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("content accuracy")
        l2, lb2 = ax2.get_legend_handles_labels()
        lines, labels = lines + l2, labels + lb2
    ax.legend(lines, labels, loc="upper right")
    fig.subplots_adjust(left=0.1, right=0.88 if acc else 0.97, bottom=0.12, top=0.95)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
