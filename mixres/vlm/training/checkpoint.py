"""Training checkpoints: weights as safetensors, the rest of the state as a weights-only torch file.

    OUT/checkpoints/step_000200/
        model.safetensors   full (unsharded) model weights, names as in `vlm.state_dict()`
        train_state.pt      optimizer (keyed by parameter name), scheduler, step,
                            data order (epoch, step in epoch), every rank's RNG states
        config.json         the run's configuration, for humans and `mixres train --resume`
    OUT/checkpoints/latest  the name of the newest complete checkpoint

Weights and optimizer go through `torch.distributed.checkpoint.state_dict` with full
state dicts, so a checkpoint is the same file whether the run was single-process, DDP or
FSDP2, and can be resumed under any of them. Only rank 0 writes; every rank reads.
A checkpoint is written to a temporary folder and renamed, so a crash mid-write never
leaves a half checkpoint as `latest`. `torch.load` is only ever called with
`weights_only=True` (the RNG states are stored as tensors and plain lists for that).

Tied weights (one tensor under two names, e.g. an HF LM's embeddings and head) are
stored once; the other names are kept in the safetensors metadata and restored on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state",
           "save_weights", "load_weights"]

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


# RNG

def rng_state() -> dict:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# weights

def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict to safetensors; aliases of one storage are stored once."""
    first: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases), "format": "pt"})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, target in aliases.items():
        state[name] = state[target]
    return state


# checkpoints

def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint under OUT/checkpoints (None if there is none)."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        ckpt = root / pointer.read_text().strip()
        if (ckpt / "train_state.pt").is_file():
            return ckpt
    return None


def save_checkpoint(out_dir, step: int, model, optimizer, scheduler, data_state: dict, config: dict,
                    *, rank: int = 0, rng_states: list[dict] | None = None, keep: int = 2) -> Path | None:
    """Collective: every rank must call it (FSDP gathers shards); only rank 0 writes.

    rng_states: every rank's `rng_state()` (gathered by the caller), or None for this one.
    Keeps the newest `keep` checkpoints (by age; the new one always).
    """
    model_sd = get_model_state_dict(model, options=_FULL)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if rank != 0:
        return None
    root = Path(out_dir) / "checkpoints"
    name = f"step_{step:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model_sd, tmp / "model.safetensors")
    torch.save({"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                "data": dict(data_state), "rng": rng_states or [rng_state()]}, tmp / "train_state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (root / ".latest.tmp").write_text(name)
    os.replace(root / ".latest.tmp", root / "latest")
    # prune by age, never by step number (a run's newest checkpoint may have a lower step
    # than an older run's), and never the one `latest` names
    old = sorted((p for p in root.glob("step_*") if p.is_dir() and p != final),
                 key=lambda p: p.stat().st_mtime_ns)
    for p in old[:len(old) - (keep - 1)] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(ckpt, model, optimizer=None, scheduler=None, *, rank: int = 0) -> dict:
    """Restore weights (and optimizer, scheduler, this rank's RNG when given) from `ckpt`.

    Returns the train state: {"step", "data", ...}. Every rank calls it.
    """
    ckpt = Path(ckpt)
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt}: no model.safetensors")
    set_model_state_dict(model, load_weights(weights), options=StateDictOptions(full_state_dict=True))
    state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    if optimizer is not None:
        # strict=False: a parameter that never had a gradient (frozen so far, or empty)
        # legitimately has no optimizer state yet
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rngs = state.get("rng") or []
    if rngs:
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return state
