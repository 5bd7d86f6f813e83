"""`mixres train CONFIG.toml` / `mixres.vlm.training.train.train(config)`: train a VLM on mixed-size images.

One step: every rank takes `accum` token-budget bins (mixres.vlm.training.sampler), its DataLoader
workers load, resize and pack them (the VLM's collator), and the loss of the step is

    sum over every trained token of every rank's bins  /  global count of trained tokens

so 1 process with accum A*W and W processes with accum A compute the same loss and the
same update (the global batch is the union of the ranks' bins). Then gradient clipping,
AdamW (no decay on norms, biases, embeddings), warm-up + cosine, staged freezing.

Outputs under OUT: metrics.jsonl (mixres.vlm.training.metrics), loss.png, summary.json and
checkpoints/ (mixres.vlm.training.checkpoint); `--resume` continues from the newest checkpoint
exactly where the data order, optimizer, schedule and RNG left off, with the run's own
settings (a fresh run never writes into another run's OUT: mixres.vlm.training.run_dir).
Only rank 0 writes.

`mixres train --synthetic --strategy S [--lm HF_LM_DIR] --out DIR` trains the shapes task of
mixres.vlm.training.synthetic with a tiny VLM and reports content_accuracy on held-out images.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from mixres.distributed import init_distributed
from mixres.packing import pack_into_bins
from mixres.vlm.interfaces import CaptionSource
from mixres.vlm.layout import target_mask
from mixres.vlm.training.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from mixres.vlm.training.config import RunConfig
from mixres.vlm.training.metrics import MetricsLog, content_hits, plot_losses
from mixres.vlm.training.optim import FreezeStages, build_optimizer, warmup_cosine
from mixres.vlm.training.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    wrap_data_parallel,
)
from mixres.vlm.training.run_dir import DEFAULT_OUT, check_resume, claim, saved_config
from mixres.vlm.training.sampler import TokenBudgetSampler
from mixres.vlm.training.synthetic import synthetic_config

__all__ = ["train", "sample_length", "evaluate", "add_arguments", "run", "synthetic_config"]

# data

def _datasets(cfg: RunConfig):
    from mixres.vlm.training.manifest import ManifestDataset
    from mixres.vlm.training.synthetic import SyntheticShapes

    d = cfg.data
    if d.synthetic:
        seed = cfg.train.seed
        # held-out split: another seed, so no training example is ever evaluated
        return (SyntheticShapes(d.synthetic, seed=2 * seed, blank_images=d.blank_images),
                SyntheticShapes(d.synthetic_eval, seed=2 * seed + 1, blank_images=d.blank_images))
    if d.manifest is None:
        raise ValueError("training config: set data.manifest (a JSONL file) or data.synthetic (a count)")
    train = ManifestDataset.from_file(cfg.resolve(d.manifest), d.placeholders)
    evals = None
    if d.eval_manifest:
        evals = ManifestDataset.from_file(cfg.resolve(d.eval_manifest), d.placeholders)
    return train, evals


def sample_length(vlm, item: dict, sizes: list[tuple[int, int]]) -> int:
    """Image + text tokens one sample brings, from image sizes alone (nothing decoded)."""
    return vlm.collator.length_from_sizes(item, sizes)


def _text_only(ds, i: int) -> dict:
    """An item's text fields without rendering or loading its images."""
    if isinstance(ds, CaptionSource):  # synthetic: the caption is known without drawing
        return ds.text_of(i)
    return {k: v for k, v in ds[i].items() if k in ("text", "prompt", "response", "conversations")}


def _lengths(vlm, ds) -> list[int]:
    return [sample_length(vlm, _text_only(ds, i), ds.image_sizes(i)) for i in range(len(ds))]


class _Collate:
    """Items -> (VLMBatch, meta) in a DataLoader worker: images are loaded and resized here."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        batch = self.collator([{k: v for k, v in it.items() if k != "content_spans"} for it in items])
        meta = [{"response": it.get("response", it.get("text", "")),
                 "content_spans": it.get("content_spans")} for it in items]
        return batch, meta


class _Bins:
    """The batch sampler a DataLoader reads: this rank's bins from (epoch, step) on."""

    def __init__(self, sampler: TokenBudgetSampler, epoch: int, step: int):
        self.sampler, self.epoch, self.step = sampler, epoch, step

    def __iter__(self):
        for _, _, b in self.sampler.iterate(self.epoch, self.step):
            yield b


def _loader(ds, batch_sampler, collate, workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_sampler=batch_sampler, collate_fn=collate, num_workers=workers,
                      persistent_workers=False, prefetch_factor=4 if workers else None)


def _num_targets(batch) -> int:
    if batch.labels is None:
        return 0
    return int(target_mask(batch.labels, batch.position_ids).sum())


def _num_tokens(batch) -> int:
    extra = 0 if batch.image_positions.numel() else sum(batch.image_token_counts)
    return batch.num_tokens + extra


# one step

def _autocast(cfg, device):
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(model, last: bool):
    """Skip gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _micro_loss(model, batch, cfg, device):
    """Sum of the token cross-entropies of one bin (a graph; 0 * logits when nothing trains)."""
    with _autocast(cfg, device):
        out = model(batch)
    if out.loss is None:
        return out.logits.sum() * 0.0
    return out.loss * _num_targets(batch)


def _grad_norm(params, clip):
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# evaluation

@torch.no_grad()
def evaluate(model, vlm, ds, lengths, max_batch_tokens, info, cfg, workers: int = 0) -> dict:
    """eval_loss (mean over trained tokens) and content_accuracy over `ds`, all ranks together."""
    bins = pack_into_bins(lengths, max_batch_tokens)
    w = info.world_size
    # every rank runs the same number of forwards (FSDP needs it); fillers count zero
    while len(bins) % w:
        bins.append([])
    mine = bins[info.rank::w]
    loader = _loader(ds, [b or bins[0] for b in mine], _Collate(vlm.collator), workers)
    model.eval()
    loss_sum = count = correct = words = 0.0
    slots: dict[int, list[int]] = {}
    for (batch, meta), b in zip(loader, mine):
        with _autocast(cfg, info.device):
            out = model(batch)
        if not b:
            continue
        n = _num_targets(batch)
        if out.loss is not None:
            loss_sum += float(out.loss) * n
        count += n
        c, t = content_hits(batch, out.logits.float(), meta, vlm.tokenizer, by_slot=slots)
        correct, words = correct + c, words + t
    model.train()
    n_slots = 3  # per-word accuracy of the first words (synthetic: colour, shape, position)
    flat = [v for k in range(n_slots) for v in slots.get(k, [0, 0])]
    loss_sum, count, correct, words, *flat = info.all_reduce([loss_sum, count, correct, words, *flat])
    res = {"eval_loss": loss_sum / max(count, 1),
           "content_accuracy": correct / words if words else None, "eval_samples": len(ds)}
    if any(flat[1::2]):
        res["accuracy_by_word"] = [flat[2 * k] / max(flat[2 * k + 1], 1) for k in range(n_slots)]
    return res


# the loop

def train(config, out=None, *, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, evaluate_at_stop: bool = False, device: str | None = None) -> dict:
    """Train as `config` says (a RunConfig, a dict or a TOML path); returns the summary.

    A fresh run refuses a non-empty `out` unless `overwrite`; `resume` refuses changed
    settings (mixres.vlm.training.run_dir).
    stop_after: leave after that many steps with a checkpoint, as if interrupted (tests);
    evaluate_at_stop: evaluate there too (an interrupted run normally does not).
    """
    from mixres.vlm import build_vlm

    cfg = RunConfig.from_any(config)
    tc = cfg.train
    out = Path(out or DEFAULT_OUT)
    info = init_distributed(device)
    if not resume and info.is_main:
        claim(out, overwrite)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    vlm = build_vlm(cfg.vlm).to(info.device)
    vlm.collator.decode = cfg.data.decode  # the image decoder of the DataLoader workers
    stages = FreezeStages(tc.stages)
    stages.check(vlm)
    ever = stages.ever_trainable(vlm)
    stages.apply(vlm, 0)
    if tc.activation_checkpointing:
        apply_activation_checkpointing(vlm)
    if tc.compile:
        apply_compile(vlm)
    model = wrap_data_parallel(vlm, info, tc.parallel, ever)
    optimizer = build_optimizer(vlm, tc.lr, tc.weight_decay, tc.betas)
    scheduler = warmup_cosine(optimizer, tc.steps, tc.warmup, tc.min_lr_ratio)

    train_ds, eval_ds = _datasets(cfg)
    sampler = TokenBudgetSampler(_lengths(vlm, train_ds), cfg.data.max_batch_tokens, seed=tc.seed,
                                 world_size=info.world_size, rank=info.rank, accum=tc.accum,
                                 min_fill=cfg.data.min_fill)
    eval_lengths = _lengths(vlm, eval_ds) if eval_ds is not None else None

    step, epoch, estep = 0, 0, 0
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    if ckpt is not None:
        check_resume(out, cfg.to_dict(), int(ckpt.name.split("_")[-1]))
        state = load_checkpoint(ckpt, model, optimizer, scheduler, rank=info.rank)
        step, epoch, estep = state["step"], state["data"]["epoch"], state["data"]["step"]
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    log = MetricsLog(out, enabled=info.is_main, truncate_after=step if ckpt is not None else None)

    def save(at_step, data_state):
        save_checkpoint(out, at_step, model, optimizer, scheduler, data_state, cfg.to_dict(),
                        rank=info.rank, rng_states=info.gather_objects(rng_state()),
                        keep=tc.keep_checkpoints)

    def run_eval(at_step):
        if eval_ds is None:
            return None
        budget = cfg.data.eval_max_batch_tokens or cfg.data.max_batch_tokens
        res = evaluate(model, vlm, eval_ds, eval_lengths, budget, info, cfg, cfg.data.num_workers)
        log.write({"step": at_step, **res})
        return res

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=step, disable=not (info.is_main and tc.progress), desc="train",
               dynamic_ncols=True)
    batches = iter(_loader(train_ds, _Bins(sampler, epoch, estep), _Collate(vlm.collator),
                           cfg.data.num_workers))
    positions = ((e, s) for e, s, _ in sampler.iterate(epoch, estep))
    t_start = time.perf_counter()
    window = {"loss": 0.0, "steps": 0, "tokens": 0.0, "images": 0.0, "t": t_start}
    last_eval, stopped_early = None, False
    while step < tc.steps:
        if stages.apply(vlm, step) and info.is_main:
            bar.write(f"step {step}: training {stages.prefixes_at(step)}")
        micro = [next(batches) for _ in range(tc.accum)]
        for _ in range(tc.accum):
            e, s = next(positions)
        local = [sum(_num_targets(b) for b, _ in micro)]
        global_count = max(info.all_reduce(local)[0], 1.0)
        loss_sum = 0.0
        for a, (batch, _) in enumerate(micro):
            with _sync(model, a == tc.accum - 1):
                lsum = _micro_loss(model, batch, cfg, info.device)
                (lsum * (info.world_size / global_count)).backward()
            loss_sum += float(lsum.detach())
        trainable = []
        for p in vlm.parameters():
            if p.requires_grad:
                trainable.append(p)
            else:
                p.grad = None  # a frozen stage's parameter must not move, not even by decay
        gnorm = _grad_norm(trainable, tc.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        data_state = {"epoch": e, "step": s + 1}

        tokens = sum(_num_tokens(b) for b, _ in micro)
        images = sum(len(b.image_token_counts) for b, _ in micro)
        loss_sum, tokens, images = info.all_reduce([loss_sum, tokens, images])
        loss = loss_sum / global_count
        window["loss"] += loss
        window["steps"] += 1
        window["tokens"] += tokens
        window["images"] += images
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            dt = max(now - window["t"], 1e-9)
            rec = {"step": step, "loss": window["loss"] / window["steps"],
                   "lr": scheduler.get_last_lr()[0], "tokens_per_s": window["tokens"] / dt,
                   "images_per_s": window["images"] / dt, "grad_norm": gnorm, "epoch": e}
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            img_s=f"{rec['images_per_s']:.1f}")
            window = {"loss": 0.0, "steps": 0, "tokens": 0.0, "images": 0.0, "t": now}
        bar.update(1)
        if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
            last_eval = run_eval(step)
        if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
            save(step, data_state)
        over = tc.time_limit is not None and time.perf_counter() - t_start > tc.time_limit
        if stop_after is not None and step >= stop_after:
            stopped_early = True
        elif over and info.all_reduce([1.0])[0] > 0:
            stopped_early = True
            if info.is_main:
                bar.write(f"time limit {tc.time_limit} s reached at step {step}")
        if stopped_early:
            break
    bar.close()
    train_s = time.perf_counter() - t_start
    del batches
    if stop_after is None or step >= tc.steps or evaluate_at_stop:
        last_eval = run_eval(step) or last_eval
    save(step, data_state if step else {"epoch": epoch, "step": estep})
    summary = {"steps": step, "train_seconds": train_s, "world_size": info.world_size,
               "parallel": tc.parallel if info.distributed else "none",
               "strategy": str(vlm.strategy), "bin_fill": sampler.fill(0),
               "final_loss": window["loss"] / window["steps"] if window["steps"] else loss,
               **(last_eval or {})}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if tc.plot:
            plot_losses(log.records(), out / "loss.png")
    info.close()
    return summary


# command line

TOML_HELP = """CONFIG is a TOML file with [vlm], [data] and [train] tables. Every key and its
default: README.md, section "Train on your data" (the same list is in the docstrings of
mixres/vlm/config.py for [vlm] and mixres/vlm/training/config.py for [data] and [train]).
Examples that run as written: examples/README.md (examples/train_tiny.toml)."""


def add_arguments(parser) -> None:
    import argparse

    parser.epilog = TOML_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", help="training TOML ([vlm], [data], [train] tables); with "
                                                  "--resume it defaults to OUT/config.json")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output folder (metrics, checkpoints, plot; default ./{DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true",
                        help="continue OUT's run from its newest checkpoint, with its settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run in a non-empty OUT, deleting the run there")
    parser.add_argument("--synthetic", action="store_true",
                        help="train the synthetic shapes task with a tiny VLM (no config needed)")
    parser.add_argument("--strategy", help="override vlm.strategy (joint_decoder | cross_attention | mot)")
    parser.add_argument("--lm", help="override vlm.lm: a local HF causal-LM directory (or hub id), "
                                     "e.g. with --synthetic")
    parser.add_argument("--blank-images", action="store_true",
                        help="synthetic: images without the shape (the no-vision baseline)")
    parser.add_argument("--steps", type=int, help="override train.steps (on --resume: extend the run)")
    parser.add_argument("--time-limit", type=float, help="override train.time_limit (seconds)")
    parser.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.synthetic:
        spec = synthetic_config(args.strategy or "joint_decoder", args.blank_images, lm=args.lm)
        if args.config:
            raise ValueError("--synthetic builds its own configuration; leave CONFIG out")
    elif args.config or args.resume:
        # --resume without CONFIG: the run's own settings, as it saved them
        spec = RunConfig.from_any(args.config or saved_config(Path(args.out))).to_dict()
        if args.strategy:
            spec["vlm"]["strategy"] = args.strategy
        if args.lm:
            spec["vlm"]["lm"] = args.lm
    else:
        raise ValueError("give a CONFIG.toml, --synthetic, or --resume with an --out that holds a run")
    if args.steps:
        spec["train"]["steps"] = args.steps
    if args.time_limit:
        spec["train"]["time_limit"] = args.time_limit
    if args.no_progress:
        spec["train"]["progress"] = False
    summary = train(spec, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    print(json.dumps(summary, indent=2))
    return 0
