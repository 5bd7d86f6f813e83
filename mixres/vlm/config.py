"""VLMConfig: what `build_vlm` builds, from a dataclass, a dict or a TOML file.

    encoder    "random" | a registered encoder / mixres backend name | a preset name, local
               path or hub id (run by the "packed" backend) | {"name": ..., **kwargs}
    adapter    "linear" | "mlp2" | "merge2x2" | {"name": ..., "keep_prefix": true, ...}
    strategy   "joint_decoder" | "cross_attention" | "mot" | {"name": ..., **kwargs}
    lm         "tiny" | {"preset": "tiny", "hidden": 48, ...} (built-in decoder) | a local
               HF causal LM directory (joint_decoder only)
    tokenizer  "bytes" | a local HF tokenizer directory (default: the HF LM's own
               directory when lm is a path, else "bytes")
    freeze     {module path: frozen}; the longest matching path wins, so
               {"encoder": true, "encoder.model.encoder.layer.1": false} trains one layer
    max_seq_tokens            the longest sample in LM positions; checked against the
                              LM's RoPE / max_position_embeddings at build time
    min_image_tokens, max_image_tokens   resize policy for PIL images and paths (encoder patches)
    seed       initialisation of everything built from scratch
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["VLMConfig"]


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file as a dict; a missing file or bad TOML is one error naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with path.open("rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{what} {path}: {e}") from None


@dataclass
class VLMConfig:
    encoder: Any = "random"
    adapter: Any = "mlp2"
    strategy: Any = "joint_decoder"
    lm: Any = "tiny"
    tokenizer: Any = None
    freeze: dict[str, bool] = field(default_factory=dict)
    max_seq_tokens: int = 2048
    min_image_tokens: int = 1
    max_image_tokens: int | None = 1024
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.freeze, dict) or not all(isinstance(v, bool) for v in self.freeze.values()):
            raise ValueError(f"VLMConfig.freeze must map module paths to true/false, got {self.freeze!r}")
        if self.max_seq_tokens <= 0:
            raise ValueError(f"VLMConfig.max_seq_tokens must be positive, got {self.max_seq_tokens}")

    @classmethod
    def from_any(cls, spec) -> VLMConfig:
        """A VLMConfig as is, a dict of its fields, or the path of a TOML file of them."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, (str, Path)):
            spec = read_toml(spec, "VLM config file")
            spec = spec.get("vlm", spec)  # allow a [vlm] table inside a larger file
        if not isinstance(spec, dict):
            raise TypeError(f"VLM config: expected a VLMConfig, a dict or a TOML path, got "
                            f"{type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"VLM config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**spec)
