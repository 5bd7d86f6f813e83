"""The output folder of a run, trusted: a fresh run never writes over another one, and a
resumed run is the same run.

- `claim(out, overwrite)`: a fresh run refuses a non-empty OUT unless `overwrite`, which
  removes what an earlier run wrote there (checkpoints, metrics, summary, config, plot).
- `check_resume(out, cfg)`: a resumed run compares its settings with OUT/config.json
  before anything is loaded and refuses a change in one line. Only settings that do
  not change what is trained may differ (RESUMABLE); extending `train.steps` is allowed
  and said: the warm-up + cosine schedule is a function of the total, so the remaining
  steps follow the longer schedule and the learning rate rises to its value there.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mixres.vlm.training.optim import schedule_factor

__all__ = ["DEFAULT_OUT", "RUN_FILES", "RESUMABLE", "claim", "saved_config", "check_resume"]

DEFAULT_OUT = "mixres-train"
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "config.json", "loss.png")
RESUMABLE = {"train.steps", "train.time_limit", "train.progress", "train.plot", "train.threads",
             "train.log_every", "train.eval_every", "train.save_every", "train.keep_checkpoints",
             "data.num_workers", "base_dir"}


def claim(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty `out` for a fresh run; with `overwrite`, clear the old run's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    if not overwrite:
        raise ValueError(f"--out {out} already holds {', '.join(present[:4])}"
                         f"{' ...' if len(present) > 4 else ''}; continue that run with --resume, "
                         f"or replace it with --overwrite")
    for name in RUN_FILES:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def saved_config(out: Path) -> dict:
    path = Path(out) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist; is {out} the --out of a mixres train run?")
    return json.loads(path.read_text())


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in ("vlm", "data", "train") and not prefix:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume(out: Path, new: dict, step: int) -> None:
    """Raise in one line if `new` (a RunConfig.to_dict()) changes what OUT was trained with."""
    old = _flat(saved_config(out))
    new = _flat(json.loads(json.dumps(new, default=str)))
    changed = [k for k in sorted(set(old) | set(new)) if k not in RESUMABLE and old.get(k) != new.get(k)]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
        raise ValueError(f"--resume: {out} was trained with {k} = {old.get(k)!r}, this run sets "
                         f"{new.get(k)!r}{more}; resume with the same settings or start a new --out")
    t_old, t_new = old.get("train.steps"), new.get("train.steps")
    if t_old != t_new:
        lr = new.get("train.lr", 0.0)
        warm, floor = new.get("train.warmup", 0), new.get("train.min_lr_ratio", 0.1)
        before = lr * schedule_factor(step, t_old, warm, floor)
        after = lr * schedule_factor(step, t_new, warm, floor)
        print(f"mixres train: train.steps {t_old} -> {t_new}: the warm-up + cosine schedule now spans "
              f"{t_new} steps, so from step {step} the learning rate follows it ({before:.3g} -> "
              f"{after:.3g}), not the schedule the run started with", file=sys.stderr)
