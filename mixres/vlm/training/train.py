"""`mixres.vlm.training.train.train(config)`: train a VLM on mixed-size images, in steps.

The shape is torchtitan's: `build` makes the parts of a run (model, wrappers, optimizer,
schedule, data), `restore` puts a resumed run back where its newest checkpoint left it,
`train_step` (mixres.vlm.training.step) is one update, `evaluate`
(mixres.vlm.training.evaluate) scores the held-out set and `save` writes a checkpoint;
`train` is the loop that calls them and logs.

Every rank takes `accum` token-budget bins per step (mixres.vlm.training.sampler); its
DataLoader workers load, resize and pack them (the VLM's collator). Outputs under OUT:
metrics.jsonl (mixres.vlm.training.metrics), loss.png, summary.json and checkpoints/
(mixres.vlm.training.checkpoint); `resume` continues from the newest checkpoint exactly
where the data order, optimizer, schedule and RNG left off, with the run's own settings
(a fresh run never writes into another run's OUT: mixres.vlm.training.run_dir); a run
that already reached its last step says so and does nothing. Only rank 0 writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mixres.distributed import DistInfo, init_distributed
from mixres.vlm.training import data
from mixres.vlm.training.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from mixres.vlm.training.config import RunConfig
from mixres.vlm.training.evaluate import evaluate
from mixres.vlm.training.metrics import MetricsLog, plot_losses
from mixres.vlm.training.optim import FreezeStages, build_optimizer, warmup_cosine
from mixres.vlm.training.parallel import apply_activation_checkpointing, apply_compile, wrap_data_parallel
from mixres.vlm.training.run_dir import DEFAULT_OUT, check_resume, claim
from mixres.vlm.training.sampler import TokenBudgetSampler
from mixres.vlm.training.step import StepResult, train_step, use_bf16

__all__ = ["Trainer", "build", "restore", "save", "run_eval", "train", "finished_at"]


@dataclass
class Trainer:
    """The parts of one run, and where it stands (step; data order: epoch, step in epoch)."""

    cfg: RunConfig
    out: Path
    info: DistInfo
    vlm: torch.nn.Module
    model: torch.nn.Module          # what is called: the VLM or its DDP / FSDP2 wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stages: FreezeStages
    sampler: TokenBudgetSampler
    train_ds: object
    eval_ds: object | None
    eval_lengths: list[int] | None
    bf16: bool
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def finished_at(out: Path, cfg: RunConfig) -> int | None:
    """The step of OUT's newest checkpoint when it is the run's last (nothing left to do)."""
    ckpt = latest_checkpoint(out)
    step = int(ckpt.name.split("_")[-1]) if ckpt is not None else -1
    return step if step >= cfg.train.steps else None


def build(cfg: RunConfig, out: Path, info: DistInfo) -> Trainer:
    """The model (frozen as stage 0 says, checkpointed, compiled, wrapped), its optimizer
    and schedule, the datasets and this rank's sampler."""
    from mixres.vlm import build_vlm

    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    vlm = build_vlm(cfg.vlm).to(info.device)
    vlm.collator.decode = cfg.data.decode  # the image decoder of the DataLoader workers
    stages = FreezeStages(tc.stages)
    stages.check(vlm)
    ever = stages.ever_trainable(vlm)
    stages.apply(vlm, 0)
    blocks = vlm.blocks()
    if tc.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if tc.compile:
        apply_compile(blocks)
    bf16 = use_bf16(tc.precision, info.device)
    model = wrap_data_parallel(vlm, blocks, info, tc.parallel, ever, bf16=bf16)
    optimizer = build_optimizer(vlm, tc.lr, tc.weight_decay, tc.betas)
    scheduler = warmup_cosine(optimizer, tc.steps, tc.warmup, tc.min_lr_ratio)
    train_ds, eval_ds = data.datasets(cfg)
    sampler = TokenBudgetSampler(data.lengths(vlm, train_ds), cfg.data.max_batch_tokens, seed=tc.seed,
                                 world_size=info.world_size, rank=info.rank, accum=tc.accum,
                                 min_fill=cfg.data.min_fill)
    eval_lengths = data.lengths(vlm, eval_ds) if eval_ds is not None else None
    return Trainer(cfg, out, info, vlm, model, optimizer, scheduler, stages, sampler, train_ds, eval_ds,
                   eval_lengths, bf16)


def restore(t: Trainer, ckpt: Path) -> None:
    """Weights, optimizer, schedule, RNG and data order from checkpoint `ckpt`."""
    state = load_checkpoint(ckpt, t.model, t.optimizer, t.scheduler, rank=t.info.rank)
    t.step, t.epoch, t.epoch_step = state["step"], state["data"]["epoch"], state["data"]["step"]


def save(t: Trainer) -> None:
    save_checkpoint(t.out, t.step, t.model, t.optimizer, t.scheduler,
                    {"epoch": t.epoch, "step": t.epoch_step}, t.cfg.to_dict(), rank=t.info.rank,
                    rng_states=t.info.gather_objects(rng_state()), keep=t.cfg.train.keep_checkpoints)


def run_eval(t: Trainer, log: MetricsLog) -> dict | None:
    if t.eval_ds is None:
        return None
    d = t.cfg.data
    res = evaluate(t.model, t.vlm, t.eval_ds, t.eval_lengths, d.eval_max_batch_tokens or d.max_batch_tokens,
                   t.info, bf16=t.bf16, workers=d.num_workers)
    log.write({"step": t.step, **res})
    return res


class _Window:
    """Means of the steps since the last log line."""

    def __init__(self):
        self.loss = self.tokens = self.images = 0.0
        self.steps, self.t = 0, time.perf_counter()

    def add(self, r: StepResult) -> None:
        self.loss += r.loss
        self.tokens += r.tokens
        self.images += r.images
        self.steps += 1

    def record(self, t: Trainer, r: StepResult) -> dict:
        dt = max(time.perf_counter() - self.t, 1e-9)
        return {"step": t.step, "loss": self.loss / self.steps, "lr": t.scheduler.get_last_lr()[0],
                "tokens_per_s": self.tokens / dt, "images_per_s": self.images / dt,
                "grad_norm": r.grad_norm, "epoch": t.epoch}


def train(config, out=None, *, resume: bool = False, overwrite: bool = False,
          stop_after: int | None = None, evaluate_at_stop: bool = False, device: str | None = None) -> dict:
    """Train as `config` says (a RunConfig, a dict or a TOML path); returns the summary.

    A fresh run refuses a non-empty `out` unless `overwrite`; `resume` refuses changed
    settings (mixres.vlm.training.run_dir), and of a run already at its last step prints
    "already at step N of N" and returns its summary with "already_done": True.
    stop_after: leave after that many steps with a checkpoint, as if interrupted (tests);
    evaluate_at_stop: evaluate there too (an interrupted run normally does not).
    """
    cfg = RunConfig.from_any(config)
    tc = cfg.train
    out = Path(out or DEFAULT_OUT)
    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    if ckpt is not None:
        check_resume(out, cfg.to_dict(), int(ckpt.name.split("_")[-1]))
    info = init_distributed(device)
    done = finished_at(out, cfg) if ckpt is not None else None
    if done is not None:
        return _already_done(out, done, tc.steps, info)
    if not resume and info.is_main:
        claim(out, overwrite)
    t = build(cfg, out, info)
    if ckpt is not None:
        restore(t, ckpt)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    log = MetricsLog(out, enabled=info.is_main, truncate_after=t.step if ckpt is not None else None)

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=t.step, disable=not (info.is_main and tc.progress), desc="train",
               dynamic_ncols=True)
    bins = data.StepBins(t.sampler, t.epoch, t.epoch_step)
    batches = iter(data.loader(t.train_ds, bins, data.Collate(t.vlm.collator), cfg.data.num_workers))
    t_start = time.perf_counter()
    window, last_eval, result = _Window(), None, None
    while t.step < tc.steps:
        if t.stages.apply(t.vlm, t.step) and info.is_main:
            bar.write(f"step {t.step}: training {t.stages.prefixes_at(t.step)}")
        micro = [next(batches)[0] for _ in range(tc.accum)]
        for _ in range(tc.accum):
            t.epoch, s = bins.positions.popleft()
        result = train_step(t.model, t.vlm, t.optimizer, t.scheduler, micro, info, bf16=t.bf16,
                            grad_clip=tc.grad_clip)
        t.step, t.epoch_step = t.step + 1, s + 1
        window.add(result)
        if t.step % tc.log_every == 0 or t.step == tc.steps:
            rec = window.record(t, result)
            log.write(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            img_s=f"{rec['images_per_s']:.1f}")
            window = _Window()
        bar.update(1)
        if tc.eval_every and t.step % tc.eval_every == 0 and t.step < tc.steps:
            last_eval = run_eval(t, log)
        if tc.save_every and t.step % tc.save_every == 0 and t.step < tc.steps:
            save(t)
        if stop_after is not None and t.step >= stop_after:
            break
        over = tc.time_limit is not None and time.perf_counter() - t_start > tc.time_limit
        if over and info.all_reduce([1.0])[0] > 0:
            if info.is_main:
                bar.write(f"time limit {tc.time_limit} s reached at step {t.step}")
            break
    bar.close()
    train_s = time.perf_counter() - t_start
    del batches
    if stop_after is None or t.step >= tc.steps or evaluate_at_stop:
        last_eval = run_eval(t, log) or last_eval
    save(t)
    final = window.loss / window.steps if window.steps else (result.loss if result else None)
    summary = {"steps": t.step, "train_seconds": train_s, "world_size": info.world_size,
               "parallel": tc.parallel if info.distributed else "none",
               "strategy": str(t.vlm.strategy), "bin_fill": t.sampler.fill(0),
               "final_loss": final, **(last_eval or {})}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if tc.plot:
            plot_losses(log.records(), out / "loss.png")
    info.close()
    return summary


def _already_done(out: Path, step: int, steps: int, info: DistInfo) -> dict:
    """A resume of a finished run: one line, and the summary it wrote."""
    if info.is_main:
        print(f"already at step {step} of {steps}")
    info.close()
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {"steps": step}
    return {**summary, "already_done": True}
