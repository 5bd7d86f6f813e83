"""VLMConfig: what `build_vlm` builds, from a dataclass, a dict or a TOML file.

    encoder    "random" | a registered encoder / mixres backend name | a preset name, local
               path or hub id (run by the "packed" backend) | {"name": ..., **kwargs}
    adapter    "linear" | "mlp2" | "merge2x2" | {"name": ..., "keep_prefix": true, ...}
    strategy   "joint_decoder" | "cross_attention" | "mot" | {"name": ..., **kwargs}
    lm         "tiny" | {"preset": "tiny", "hidden": 48, ...} (built-in decoder) | a local
               HF causal LM directory or hub id (every strategy on Llama, Qwen2, Mistral;
               joint_decoder on any other causal LM)
    tokenizer  "bytes" | a local HF tokenizer directory or hub id (default: the HF LM's
               own; the byte tokenizer, with a notice, when its directory has none)
    freeze     {module path: frozen}; the longest matching path wins, so
               {"encoder": true, "encoder.model.encoder.layer.1": false} trains one layer
    max_seq_tokens            the longest sample in LM positions; checked against the
                              LM's RoPE / max_position_embeddings at build time
    min_image_tokens, max_image_tokens   resize policy for PIL images and paths (encoder patches)
    seed       initialisation of everything built from scratch
"""

from __future__ import annotations

import json
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["VLMConfig", "read_toml", "check_types"]

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          type(None): "none", list: "a list", dict: "a table"}


def _ok(value, tp) -> bool:
    if tp is Any:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_ok(v, args[0]) for v in value) if args else True
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _describe(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    base = typing.get_origin(tp) or tp
    return _NAMES.get(base, getattr(base, "__name__", str(base)))


def check_types(cls, values: dict, where: str) -> None:
    """Each value against its dataclass field's annotation; one line naming the key."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        tp = hints.get(name, Any)
        if not _ok(value, tp):
            raise ValueError(f"{where} {name} must be {_describe(tp)}, got {value!r} "
                             f"({_NAMES.get(type(value), type(value).__name__)})")


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
            if str(spec).endswith(".json"):  # a training run's config.json
                path = Path(spec)
                if not path.is_file():
                    raise FileNotFoundError(f"VLM config file {path} does not exist")
                spec = json.loads(path.read_text())
            else:
                spec = read_toml(spec, "VLM config file")
            spec = spec.get("vlm", spec)  # allow a [vlm] table inside a larger file
        if not isinstance(spec, dict):
            raise TypeError(f"VLM config: expected a VLMConfig, a dict or a TOML path, got "
                            f"{type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"VLM config: unknown keys {unknown}; known: {sorted(known)}")
        check_types(cls, spec, "VLM config")
        return cls(**spec)
