"""The configuration of a training run: `[vlm]`, `[data]` and `[train]` tables of one TOML file.

    [vlm]                      # mixres.vlm.VLMConfig: encoder, adapter, strategy, lm, ...
    strategy = "joint_decoder"

    [data]
    manifest = "train.jsonl"   # relative paths are relative to the TOML file
    eval_manifest = "val.jsonl"
    max_batch_tokens = 2048          # image + text tokens of one micro-batch (one bin)
    num_workers = 2
    decode = "fast"            # how image files are decoded: "pil" (default) | "fast" | "cuda"

    [train]
    steps = 1000
    lr = 1e-3
    warmup = 50
    accum = 1                  # micro-batches per step and rank
    parallel = "ddp"           # "ddp" | "fsdp" (FSDP2 fully_shard) under torchrun
    [[train.stages]]           # staged freezing: adapter only, then adapter + LM
    until = 200
    train = ["adapter"]
    [[train.stages]]
    train = ["adapter", "lm"]

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mixres.renamed import BATCH_TOKENS, take_renamed
from mixres.vlm.config import check_types

__all__ = ["DataConfig", "OptimConfig", "RunConfig"]

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


@dataclass
class DataConfig:
    manifest: str | None = None       # JSONL (see mixres.vlm.training.manifest)
    eval_manifest: str | None = None
    placeholders: str = "prepend"     # "prepend" | "require" (<image> in every sample with images)
    synthetic: int = 0                # >0: that many synthetic shape examples instead of a manifest
    synthetic_eval: int = 256
    blank_images: bool = False        # synthetic: same captions, images without the shape
    max_batch_tokens: int = 1024            # budget of one micro-batch
    eval_max_batch_tokens: int | None = None
    num_workers: int = 0
    decode: str = "pil"               # image files: "pil" | "fast" | "cuda" (mixres.decode)
    min_fill: float = 0.9             # bins emptier than this are repacked with the next chunk

    def __post_init__(self):
        if self.decode == "cuda" and self.num_workers:
            raise ValueError("data.decode = 'cuda' cannot run in DataLoader workers (CUDA does not fork): "
                             "set data.num_workers = 0 or use data.decode = 'fast'")


@dataclass
class OptimConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    accum: int = 1
    seed: int = 0
    precision: str = "auto"           # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False             # torch.compile each decoder block
    activation_checkpointing: bool = False
    parallel: str = "ddp"
    log_every: int = 10
    eval_every: int = 0               # 0: only at the end
    save_every: int = 0               # 0: only at the end
    keep_checkpoints: int = 2
    time_limit: float | None = None   # seconds of training; then evaluate, save and stop
    progress: bool = True
    plot: bool = True                 # OUT/loss.png at the end
    threads: int | None = None        # torch.set_num_threads (1 on a busy CPU: tiny ops lose to sync)
    stages: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"train.parallel must be one of {PARALLEL}, got {self.parallel!r}")
        for name in ("steps", "accum", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self, name)}")


def _section(cls, values: dict | None, where: str):
    values = dict(values or {})
    if cls is DataConfig:
        values = take_renamed(values, BATCH_TOKENS, where)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    check_types(cls, values, where)
    return cls(**values)


def _resolve_vlm_paths(vlm: dict, base: Path) -> dict:
    """lm / tokenizer given as paths relative to the TOML file -> absolute (when they exist
    there), so a config runs the same from any working directory."""
    for key in ("lm", "tokenizer"):
        v = vlm.get(key)
        if isinstance(v, str) and v not in ("tiny", "small", "bytes") and not Path(v).is_absolute():
            if (base / v).exists():
                vlm[key] = str((base / v).resolve())
    return vlm


@dataclass
class RunConfig:
    vlm: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    base_dir: str = "."               # where relative data paths start (the TOML's folder)

    @classmethod
    def from_any(cls, spec) -> RunConfig:
        """A RunConfig, a dict {"vlm", "data", "train"} or the path of a TOML file."""
        if isinstance(spec, cls):
            return spec
        base = "."
        if isinstance(spec, (str, Path)):
            from mixres.vlm.config import read_toml

            path = Path(spec)
            spec = read_toml(path, "training config")
            base = str(path.resolve().parent)
            spec["vlm"] = _resolve_vlm_paths(dict(spec.get("vlm", {})), Path(base))
        if not isinstance(spec, dict):
            raise TypeError(f"training config: expected a dict or a TOML path, got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"vlm", "data", "train", "base_dir"})
        if unknown:
            raise ValueError(f"training config: unknown tables {unknown}; expected [vlm], [data], [train]")
        data, train = spec.get("data", {}), spec.get("train", {})
        return cls(vlm=dict(spec.get("vlm", {})),
                   data=data if isinstance(data, DataConfig) else _section(DataConfig, data, "[data]"),
                   train=train if isinstance(train, OptimConfig) else _section(OptimConfig, train, "[train]"),
                   base_dir=spec.get("base_dir", base))

    def resolve(self, path: str | None) -> Path | None:
        if path is None:
            return None
        p = Path(path)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def to_dict(self) -> dict:
        from mixres.vlm.config import VLMConfig

        # every VLM setting spelled out (defaults included): what config.json records and
        # what a resume is compared with
        vlm = {**asdict(VLMConfig()), **self.vlm}
        return {"vlm": vlm, "data": asdict(self.data), "train": asdict(self.train),
                "base_dir": self.base_dir}
