"""Any HF causal LM as the VLM's language model, run packed, under every strategy.

The whole batch is one sequence with per-sample restarting positions. HF's own packed-
sequence detection from position ids only happens on its flash-attention path; elsewhere
(CPU, sdpa, eager) the samples would attend to each other. So the model is loaded with
attention implementation "mixres_varlen" (`mixres.attention.register_hf_attention`) and
the segment offsets travel to every attention layer as the `cu_seq_lens_q/k` kwargs:
causal attention within each sample, no mask, no padding, on any device. An LM passed in
as a module is left as it was given: mixres runs a twin of it, the same parameter tensors
in modules built on a copy of its config (so its own attention implementation, and a
vocabulary grown for `<image>`, stay the twin's business).

For the Llama, Qwen2 and Mistral families mixres runs the decoder itself, layer by layer,
as their `Model.forward` does (rotary `position_embeddings` once, each HF layer's own
forward, the final norm), which is what lets a strategy add to it without touching one
line of the HF modules:
    joint_decoder    the HF layers as they are
    cross_attention  a gated cross-attention block (mixres.vlm.lm, tanh gates starting at
                     0) before every k-th layer, reading each sample's image tokens through
                     varlen attention with separate query / key offsets
    mot              per layer an image expert: a copy of the layer (attention projections,
                     MLP, norms) initialised from the LM; tokens are routed to the text or
                     the image weights by modality id (gather / scatter), attention is
                     joint over the packed sequence (mixres.vlm.hf_mot)
The KV cache of `generate` is mixres' packed `KVCache`, handed to the HF attention layers
through the `update` call they make on any cache. Other HF families run whole (their
`base_model`) under joint_decoder, and decode without a cache.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from mixres.attention import HF_ATTN_NAME, register_hf_attention
from mixres.vlm.hf_mot import mot_layer
from mixres.vlm.layout import IMAGE
from mixres.vlm.lm import GatedCrossAttentionBlock, KVCache, LMConfig

__all__ = ["HFCausalLM", "LAYERWISE"]

# model types whose decoder mixres runs layer by layer (their Model.forward is exactly
# embed -> rotary -> layers -> norm, and their layers are Llama-shaped)
LAYERWISE = ("llama", "qwen2", "mistral")


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


def load_hf_lm(spec):
    """A local HF causal-LM directory or hub id -> the model (fp32 weights, varlen attention)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(spec), attn_implementation=HF_ATTN_NAME,
                                                    dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"lm {str(spec)!r} could not be loaded as an HF causal LM ({first})") from e


class _CacheView:
    """mixres' KVCache behind the one call HF attention layers make on a cache:
    `update(key, value, layer_idx, ...)` with (1, heads, T, d) tensors."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def update(self, key, value, layer_idx, *args, **kwargs):
        k, v = self.cache.update(layer_idx, key[0].transpose(0, 1), value[0].transpose(0, 1))
        return k.transpose(0, 1)[None], v.transpose(0, 1)[None]


class HFCausalLM(nn.Module):
    """`model`: a local directory or hub id of an HF causal LM, or a PreTrainedModel.

    plan_for: the strategy's `decoder_plan` (called with the number of layers); its
    "self" / "mot" entries are the HF layers in order, "xattn" entries new blocks between.
    State dict: `model.*` the HF LM untouched, `xattn.<i>.*` the block before layer i,
    `image_experts.<i>.*` layer i's image expert.
    """

    def __init__(self, model, vocab_size: int | None = None, plan_for=None):
        super().__init__()
        register_hf_attention()
        if isinstance(model, (str, Path)):
            model = load_hf_lm(model)
        else:
            model = _twin(model, HF_ATTN_NAME)
        self.model_type = model.config.get_text_config().model_type
        _check_causal(model, f"HF LM {type(model).__name__}")
        if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size)
        self.model = model
        self.layerwise = self.model_type in LAYERWISE
        n = model.config.get_text_config().num_hidden_layers
        plan = plan_for(SimpleNamespace(layers=n)) if plan_for else [("self", {})] * n
        kinds = [k for k, _ in plan]
        if not self.layerwise and set(kinds) != {"self"}:
            raise ValueError(f"strategies other than joint_decoder run HF LMs of the types {LAYERWISE}; "
                             f"this LM is {self.model_type!r}")
        if sum(k in ("self", "mot") for k in kinds) != n:
            raise ValueError(f"decoder plan {kinds} does not have one self/mot entry per HF layer ({n})")
        self.xattn = nn.ModuleDict()
        layer, mot = 0, False
        for kind, kwargs in plan:
            if kind == "xattn":
                self.xattn[str(layer)] = self._new_xattn(**kwargs)
            else:
                mot = mot or kind == "mot"
                layer += 1
        layers = self.model.base_model.layers
        # each image expert starts as an exact copy of its layer (Mixture-of-Transformers)
        self.image_experts = nn.ModuleList(_copy(m) for m in layers) if mot else None

    def _new_xattn(self, gate_init: float = 0.0) -> GatedCrossAttentionBlock:
        c = self.model.config.get_text_config()
        cfg = LMConfig(vocab_size=self.vocab_size, hidden=c.hidden_size, layers=1,
                            heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                            mlp=c.intermediate_size, norm_eps=c.rms_norm_eps)
        block = GatedCrossAttentionBlock(cfg, 0, gate_init=gate_init)
        for m in block.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=getattr(c, "initializer_range", 0.02))
        return block

    @property
    def blocks(self) -> list[nn.Module]:
        """Every cross-attention block, HF layer and image expert, in the order they run."""
        out = []
        for i, layer in enumerate(self.model.base_model.layers):
            if str(i) in self.xattn:
                out.append(self.xattn[str(i)])
            out.append(layer)
            if self.image_experts is not None:
                out.append(self.image_experts[i])
        return out

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

    def new_cache(self) -> KVCache | None:
        """A packed KV cache for every HF layer (None where mixres does not run the layers)."""
        if not self.layerwise:
            return None
        return KVCache(len(self.model.base_model.layers))

    def _check_window(self, max_k: int) -> None:
        c = self.model.config.get_text_config()
        window = getattr(c, "sliding_window", None)
        if self.model_type == "qwen2" and not getattr(c, "use_sliding_window", False):
            window = None
        if window is not None and max_k > window:
            raise ValueError(f"a sample of {max_k} positions exceeds the LM's sliding window {window}, "
                             f"which mixres' varlen attention does not apply; shorten samples")

    def run(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """(T, D) packed embeddings -> (T, D) final hidden states."""
        base = self.model.base_model
        cache = ctx.cache
        if not self.layerwise:
            if cache is not None or ctx.memory is not None or ctx.modality_ids is not None:
                raise ValueError(f"HF LM type {self.model_type!r} runs joint layouts only")
            from mixres.attention import hf_varlen_kwargs

            out = base(inputs_embeds=x[None], position_ids=ctx.positions[None], use_cache=False,
                       **hf_varlen_kwargs(ctx.cu_q, ctx.max_q))
            return out.last_hidden_state[0]
        if ctx.modality_ids is not None and not ctx.routes:
            ctx.routes = [(ctx.modality_ids == m).nonzero().squeeze(1) for m in range(2)]
        if cache is not None:
            cache.plan((ctx.cu_q[1:] - ctx.cu_q[:-1]).long())
        cu_k, max_k = (cache.cu_k, cache.max_k) if cache is not None else (ctx.cu_q, ctx.max_q)
        self._check_window(max_k)
        kw = {"cu_seq_lens_q": ctx.cu_q, "cu_seq_lens_k": cu_k, "max_length_q": ctx.max_q,
              "max_length_k": max_k}
        pos = ctx.positions[None]
        h = x[None]
        pe = base.rotary_emb(h, position_ids=pos)
        view = _CacheView(cache) if cache is not None else None
        routed = self.image_experts is not None and bool(ctx.routes) and ctx.routes[IMAGE].numel() > 0
        for i, layer in enumerate(base.layers):
            block = self.xattn[str(i)] if str(i) in self.xattn else None
            if block is not None:
                h = block(h[0], ctx)[None]
            if routed:
                h = mot_layer((layer, self.image_experts[i]), h[0], ctx, pe, cache, i, kw)[None]
            else:
                h = layer(h, attention_mask=None, position_ids=pos, cache=view, use_cache=False,
                          position_embeddings=pe, **kw)
                if isinstance(h, tuple):
                    h = h[0]
        return base.norm(h)[0]


def _copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def _twin(model: nn.Module, attn_implementation: str) -> nn.Module:
    """`model` as another module tree on a copy of its config that runs `attn_implementation`:
    its parameters and buffers are the very tensors of `model` (nothing is copied, the
    weights train as one), and `model` itself, its config included, is left as it was."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        twin = type(model)(config)
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        owner, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(owner), leaf, tensor)
    for twin_module, module in zip(twin.modules(), model.modules()):
        # plain tensor attributes (a rotary embedding's original frequencies) come along too
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not key.startswith("_"):
                twin_module.__dict__[key] = value
    return twin.train(model.training)
