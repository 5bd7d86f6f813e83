"""Modality strategies: how image tokens meet the language model.

A strategy is a plain, stateless object (not an nn.Module), so FSDP / DCP never see it
and the state dict holds only the LM's, the adapter's and the encoder's weights. It
decides three things:
    expands_images   whether image tokens take positions in the LM sequence (the collator
                     lays samples out accordingly)
    decoder_plan     which blocks the LM is made of: for the built-in decoder its blocks, for
                     an HF LM which of its layers get an image expert ("mot") and where
                     gated cross-attention blocks go in between ("xattn"); mixres.vlm.hf_lm
    forward          how the text embeddings and the image tokens enter the LM

    joint_decoder    image tokens replace the <image> placeholders (LLaVA)
    cross_attention  text-only residual stream; gated cross-attention blocks every k
                     layers read only the sample's own image tokens (Flamingo)
    mot              joint layout; every block has modality-specific weights routed by
                     modality id, with one global causal attention (Mixture-of-Transformers)
"""

from __future__ import annotations

import torch

from mixres.vlm.lm import SeqContext
from mixres.vlm.registry import STRATEGIES, register_strategy

__all__ = ["ModalityStrategy", "JointDecoder", "CrossAttention", "MixtureOfTransformers",
           "build_strategy"]


class ModalityStrategy:
    name = "base"
    expands_images = True

    def decoder_plan(self, cfg) -> list[tuple[str, dict]]:
        return [("self", {})] * cfg.layers

    def context(self, batch, image_tokens, cache=None) -> SeqContext:
        return SeqContext(cu_q=batch.cu_seqlens, max_q=batch.max_seqlen,
                          positions=batch.position_ids, cache=cache)

    def embed(self, lm, batch, image_tokens) -> torch.Tensor:
        """(T, D) LM inputs: text embeddings with the image tokens in their positions."""
        x = lm.embed(batch.input_ids)
        if image_tokens is not None and batch.image_positions.numel():
            if image_tokens.shape[0] != batch.image_positions.numel():
                raise ValueError(f"{self.name}: the adapter gave {image_tokens.shape[0]} image tokens, "
                                 f"the batch has {batch.image_positions.numel()} image positions")
            x = x.index_copy(0, batch.image_positions, image_tokens.to(x.dtype))
        return x

    def forward(self, lm, batch, image_tokens: torch.Tensor | None, cache=None) -> torch.Tensor:
        """(T, D) final hidden states of every position of the packed batch."""
        return lm.run(self.embed(lm, batch, image_tokens), self.context(batch, image_tokens, cache))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


@register_strategy("joint_decoder")
class JointDecoder(ModalityStrategy):
    name = "joint_decoder"


@register_strategy("mot")
class MixtureOfTransformers(ModalityStrategy):
    name = "mot"

    def decoder_plan(self, cfg):
        return [("mot", {})] * cfg.layers

    def context(self, batch, image_tokens, cache=None):
        ctx = super().context(batch, image_tokens, cache)
        ctx.modality_ids = batch.modality_ids
        return ctx


@register_strategy("cross_attention")
class CrossAttention(ModalityStrategy):
    """every: a gated cross-attention block before every `every`-th LM layer (Flamingo: 1-4).
    gate_init: tanh-gate start value; Flamingo's 0 makes the untrained model text-only."""

    name = "cross_attention"
    expands_images = False

    def __init__(self, every: int = 1, gate_init: float = 0.0):
        if every < 1:
            raise ValueError(f"cross_attention: every must be >= 1, got {every}")
        self.every, self.gate_init = every, gate_init

    def decoder_plan(self, cfg):
        plan = []
        for i in range(cfg.layers):
            if i % self.every == 0:
                plan.append(("xattn", {"gate_init": self.gate_init}))
            plan.append(("self", {}))
        return plan

    def embed(self, lm, batch, image_tokens):
        return lm.embed(batch.input_ids)  # images stay out of the residual stream

    def context(self, batch, image_tokens, cache=None):
        ctx = super().context(batch, image_tokens, cache)
        if image_tokens is not None:
            cu = batch.image_token_cu.to(batch.cu_seqlens.device)
            ctx.memory, ctx.memory_cu = image_tokens, cu
            ctx.memory_max = int((cu[1:] - cu[:-1]).max())
        return ctx


def build_strategy(spec) -> ModalityStrategy:
    """"mot" or {"name": "cross_attention", "every": 2} -> a strategy object."""
    if isinstance(spec, ModalityStrategy):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    kwargs = dict(spec)
    return STRATEGIES.get(kwargs.pop("name"))(**kwargs)
