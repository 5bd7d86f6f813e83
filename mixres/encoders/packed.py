"""Backend "packed": pretrained HF ViT-family encoders run patch-n-pack (NaViT-style).

All images of a chunk become ONE sequence (1, N_total, D): each image's prefix tokens
(CLS, distillation, registers) then its patches row-major. The model's own encoder layers
run on it unchanged; only the attention function is swapped, for the duration of the
call, to the registered "mixres_varlen" (block-diagonal over `cu_seqlens`), so every
image attends only to itself and its tokens equal the model run on that image alone.

What differs per family is its `Recipe` (`mixres.families.<family>`): embed, layers,
final norm, pooling, and optionally its own layer runner for blocks HF's
AttentionInterface cannot reach.

The user's model is never modified: the attention implementation of the tower's
configs is restored in `finally`, no hooks are installed and no module is patched.
(Concurrent encodes of the SAME model object from several threads are not supported,
because the attention implementation lives on the shared config.)
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch
from torch import nn

from mixres import families
from mixres.attention import hf_varlen_kwargs, register_hf_attention, varlen_context
from mixres.encoders import register_encoder_backend
from mixres.encoders.base import Encoder, resolve_layer
from mixres.families import PosCache, Recipe
from mixres.families.spec import per_model
from mixres.packing import PackedFeatures, PackedImages

__all__ = ["PackedEncoder", "packed_recipe", "run_hf_layers", "varlen_attention_impl"]


def packed_recipe(tower: nn.Module) -> Recipe:
    spec = families.spec_of(tower)
    if spec is None or spec.recipe is None:
        try:
            key = families.family(tower)
        except families.UnknownImageEncoderError:
            key = None
        with_recipe = [k for k, s in families.FAMILIES.load_all().items() if s.recipe is not None]
        raise ValueError(f"packed backend: no recipe for model_type {key!r} ({type(tower).__name__}); "
                         f"supported: {sorted(with_recipe)}. backend='loop' or 'grouped' run any "
                         f"HF vision model")
    return spec.recipe


# running HF layers on the packed sequence

@contextlib.contextmanager
def varlen_attention_impl(tower: nn.Module):
    """Switch the tower to "mixres_varlen" and restore each of its models' implementation afterwards.

    Through transformers' public `set_attn_implementation`, which checks the name against the
    AttentionInterface and reaches every sub-model and sub-config the way HF itself does.
    """
    name = register_hf_attention()
    models = _hf_models(tower)
    saved = [(m, m.config._attn_implementation) for m in models]
    try:
        for m in models[:1]:  # the outermost: HF carries it down to the rest
            m.set_attn_implementation(name)
        yield
    finally:
        # outermost first: its call carries its value down, then an inner model with a value
        # of its own gets it back
        for m, impl in saved:
            if m.config._attn_implementation != impl:
                m.set_attn_implementation(impl)


@per_model
def _hf_models(tower: nn.Module) -> list:
    """The tower's HF models, outermost first (a walk over every module: once per tower)."""
    from transformers import PreTrainedModel

    return [m for m in tower.modules() if isinstance(m, PreTrainedModel)]


# layer class -> (takes attention_mask, takes **kwargs): a pure fact of the class (weak keys)
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_signature(layer: nn.Module) -> tuple[bool, bool]:
    cls = type(layer)
    if cls not in _SIGNATURES:
        params = inspect.signature(layer.forward).parameters
        _SIGNATURES[cls] = ("attention_mask" in params,
                            any(p.kind is p.VAR_KEYWORD for p in params.values()))
    return _SIGNATURES[cls]


def run_hf_layers(layers, hidden: torch.Tensor, cu: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """hidden (1, N, D) through HF `layers`; the varlen offsets reach the attention via kwargs,
    or via `varlen_context` for layers that do not forward them (DINOv2, transformers 5.17)."""
    kwargs = {**hf_varlen_kwargs(cu), **layer_kwargs}
    with varlen_context(kwargs):
        for layer in layers:
            takes_mask, takes_kwargs = _layer_signature(layer)
            kw = dict(kwargs) if takes_kwargs else {}
            if takes_mask:
                kw["attention_mask"] = None
            out = layer(hidden, **kw)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@register_encoder_backend("packed")
class PackedEncoder(Encoder):
    """Patch-n-pack execution of any family with a packed recipe (ViT, DeiT, CLIP, SigLIP,
    SigLIP2, DINOv2, DINOv3 ViT, ...)."""

    cpu_chunk_tokens = 2048  # see Encoder: cache-sized GEMMs on the CPU

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self.tower = families.vision_tower(self.model)
        self.recipe = packed_recipe(self.tower)
        resolve_layer(self.select_layer, len(self.recipe.layers(self.tower)))  # fail early
        self.cache = PosCache.of(self.tower)

    def forward(self, packed: PackedImages) -> PackedFeatures:
        tower, recipe = self.tower, self.recipe
        layers = recipe.layers(tower)
        stop = resolve_layer(self.select_layer, len(layers))
        hf = recipe.run is None
        with varlen_attention_impl(tower) if hf else contextlib.nullcontext():
            emb = recipe.embed(tower, packed, self.cache)
            num_prefix = self._check_prefix(emb.hidden.shape[0], packed)
            cu = emb.cu_seqlens.to(torch.int32)
            run = run_hf_layers if hf else recipe.run
            hidden = run(layers[:stop], emb.hidden[None], cu, emb.layer_kwargs)[0]
            pooled = None
            if self.select_layer == -1:
                norm = recipe.final_norm(tower)
                if norm is not None:
                    hidden = norm(hidden)
                pooled = recipe.pool(tower, hidden, cu)
        return PackedFeatures(hidden, cu, packed.grid_hw, num_prefix, pooled)

    def _check_prefix(self, tokens: int, packed: PackedImages) -> int:
        """The spec's prefix count, checked against what the recipe's embed produced."""
        num_prefix = self.num_prefix
        made, b = tokens - int(packed.cu_seqlens[-1]), packed.num_images
        if made != num_prefix * b:
            raise ValueError(f"family {families.family(self.tower)!r}: its spec says {num_prefix} prefix "
                             f"token(s) per image but its recipe's embed made {made / max(b, 1):g}; "
                             f"fix prefix_tokens or the recipe in mixres/families/")
        return num_prefix
