"""Any HF causal LM as the VLM's language model (joint_decoder), run packed.

The whole batch is one sequence of `inputs_embeds` with per-sample restarting
`position_ids`. HF's own packed-sequence detection from position ids only happens on
its flash-attention path; elsewhere (CPU, sdpa, eager) the samples would attend to each
other. So the model is loaded with attention implementation "mixres_varlen"
(`mixres.attention.register_hf_attention`), and the segment offsets travel to every
attention layer as the `cu_seq_lens_q/k` kwargs: causal attention within each sample,
no mask, no padding, on any device. For `generate` (one prompt, no packing) the model
switches to "sdpa" for the call, so HF's generate and its KV cache work unchanged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from mixres.attention import HF_ATTN_NAME, hf_varlen_kwargs, register_hf_attention

__all__ = ["HFCausalLM"]


def _check_causal(model: nn.Module, where: str) -> None:
    """The varlen hook reads `module.is_causal`; every self-attention layer must set it."""
    attns = [(n, m) for n, m in model.named_modules()
             if type(m).__name__.endswith("Attention") and hasattr(m, "is_causal")]
    if not attns:
        raise ValueError(f"{where}: found no attention modules with an `is_causal` attribute; "
                         f"mixres cannot verify that its varlen attention will be causal")
    bad = [n for n, m in attns if m.is_causal is not True]
    if bad:
        raise ValueError(f"{where}: attention modules {bad[:3]} have is_causal != True; a causal "
                         f"LM is required")


class HFCausalLM(nn.Module):
    """`model`: a local directory of an HF causal LM, or a PreTrainedModel instance."""

    def __init__(self, model, vocab_size: int | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        register_hf_attention()
        if isinstance(model, (str, Path)):
            if not Path(model).is_dir():
                raise ValueError(f"lm {str(model)!r}: expected 'tiny', a dict for the built-in decoder "
                                 f"or a local HF causal-LM directory")
            model = AutoModelForCausalLM.from_pretrained(str(model), attn_implementation=HF_ATTN_NAME)
        else:
            model.set_attn_implementation(HF_ATTN_NAME)
        where = f"HF LM {type(model).__name__}"
        _check_causal(model, where)
        if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
        self.model = model

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().out_features

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 1 << 30))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(h)

    def run(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """(T, D) packed embeddings -> (T, D) final hidden states; ctx gives cu_q, positions."""
        if ctx.cache is not None or ctx.memory is not None or ctx.modality_ids is not None:
            raise ValueError("HFCausalLM runs joint layouts only (no mixres KV cache, memory or routing)")
        out = self.model.base_model(inputs_embeds=x[None], position_ids=ctx.positions[None],
                                    use_cache=False, **hf_varlen_kwargs(ctx.cu_q, ctx.max_q))
        return out.last_hidden_state[0]

    @contextlib.contextmanager
    def _attn(self, name: str):
        old = self.model.config._attn_implementation
        self.model.set_attn_implementation(name)
        try:
            yield
        finally:
            self.model.set_attn_implementation(old)

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, max_new_tokens: int, eos_id: int | None) -> list[int]:
        """Greedy decoding of one prompt given as (T, D) embeddings, through HF's generate."""
        with self._attn("sdpa"):
            out = self.model.generate(inputs_embeds=embeds[None],
                                      attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long,
                                                                device=embeds.device),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=eos_id, pad_token_id=eos_id if eos_id is not None else 0)
        return out[0].tolist()
