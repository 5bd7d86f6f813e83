"""`build_vlm(config)`: parts from the registries, sizes wired, budgets checked, freezes applied."""

from __future__ import annotations

from pathlib import Path

import torch

from mixres.vlm.adapters import build_adapter
from mixres.vlm.config import VLMConfig
from mixres.vlm.lm import LM_PRESETS, CausalLM, LMConfig
from mixres.vlm.model import VLM, apply_freeze
from mixres.vlm.strategies import build_strategy
from mixres.vlm.tokenizer import load_tokenizer
from mixres.vlm.vision import build_tower

__all__ = ["build_vlm", "build_lm"]


def build_lm(spec, strategy, vocab_size: int):
    """"tiny" / a dict -> the built-in decoder laid out by the strategy; a path -> HF LM."""
    if isinstance(spec, torch.nn.Module) and not _is_hf_model(spec):
        return spec
    if isinstance(spec, str) and spec in LM_PRESETS:
        spec = {"preset": spec}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        kwargs = {**LM_PRESETS[kwargs.pop("preset", "tiny")], **kwargs}
        given = kwargs.setdefault("vocab_size", vocab_size)
        if given < vocab_size:
            raise ValueError(f"lm.vocab_size {given} is smaller than the tokenizer's {vocab_size}")
        try:
            cfg = LMConfig(**kwargs)
        except TypeError as e:
            raise ValueError(f"lm: {e}; LMConfig fields: "
                             f"{list(LMConfig.__dataclass_fields__)}") from e
        return CausalLM(cfg, strategy.decoder_plan(cfg))
    if isinstance(spec, (str, Path)):
        from mixres.vlm.hf_lm import HFCausalLM

        check_lm_spec(spec)
        return HFCausalLM(spec, vocab_size=vocab_size, plan_for=strategy.decoder_plan)
    if _is_hf_model(spec):
        from mixres.vlm.hf_lm import HFCausalLM

        return HFCausalLM(spec, vocab_size=vocab_size, plan_for=strategy.decoder_plan)
    raise TypeError(f"lm: expected a preset name {sorted(LM_PRESETS)}, a dict or a local HF path, "
                    f"got {type(spec).__name__}")


def _is_hf_model(spec) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(spec, PreTrainedModel)


def check_lm_spec(spec) -> None:
    """A path-like LM spec must be a local directory or a hub id ('org/name'); said as the LM."""
    from mixres.vlm.tokenizer import _looks_like_hub_id

    if isinstance(spec, (str, Path)) and str(spec) not in LM_PRESETS:
        p = Path(spec)
        if p.is_file():
            raise ValueError(f"lm {str(spec)!r} is a file; expected 'tiny', a dict for the built-in "
                             f"decoder, or an HF causal-LM directory / hub id")
        if not p.is_dir() and not _looks_like_hub_id(spec):
            raise ValueError(f"lm {str(spec)!r}: no such directory; expected 'tiny', a dict for the "
                             f"built-in decoder, or an HF causal-LM directory / hub id")


def _check_budgets(cfg: VLMConfig, lm, adapter, tower) -> None:
    if cfg.max_seq_tokens > lm.max_positions:
        raise ValueError(f"max_seq_tokens {cfg.max_seq_tokens} exceeds what the LM can place: "
                         f"{type(lm).__name__} max positions {lm.max_positions}; lower max_seq_tokens "
                         f"or raise the LM's max_positions / max_position_embeddings")
    if cfg.max_image_tokens is not None:
        m = adapter.grid_multiple
        largest = adapter.layout(tower).tokens((m, cfg.max_image_tokens // m))
        if largest >= cfg.max_seq_tokens:
            raise ValueError(f"one image may bring up to {largest} LM tokens (max_image_tokens "
                             f"{cfg.max_image_tokens}), which leaves no room for text in "
                             f"max_seq_tokens {cfg.max_seq_tokens}")


def build_vlm(config) -> VLM:
    """A VLM from a VLMConfig, a dict of its fields, a TOML path or a run's config.json
    (see mixres.vlm.config); `mixres.vlm.load_run` adds the run's trained weights."""
    cfg = VLMConfig.from_any(config)
    check_lm_spec(cfg.lm)  # before the tokenizer, which defaults to the LM's own
    lm_is_path = isinstance(cfg.lm, (str, Path)) and cfg.lm not in LM_PRESETS
    tokenizer = load_tokenizer(cfg.tokenizer, lm_path=cfg.lm if lm_is_path else None)
    strategy = build_strategy(cfg.strategy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        tower = build_tower(cfg.encoder)
        lm = build_lm(cfg.lm, strategy, tokenizer.vocab_size)
        adapter = build_adapter(cfg.adapter, tower.hidden_size, lm.hidden_size)
    if tokenizer.vocab_size > lm.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the LM only {lm.vocab_size}")
    _check_budgets(cfg, lm, adapter, tower)
    vlm = VLM(tower, adapter, lm, strategy, tokenizer, config=cfg,
              min_image_tokens=cfg.min_image_tokens, max_image_tokens=cfg.max_image_tokens,
              max_seq_tokens=cfg.max_seq_tokens)
    apply_freeze(vlm, cfg.freeze)
    return vlm
