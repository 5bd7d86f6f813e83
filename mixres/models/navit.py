"""NaViT as a transformers model: `NaViTConfig` / `NaViTModel`, registered with the Auto classes.

`NaViTModel` wraps `vit_pytorch.na_vit.NaViT` (as `self.navit`, weights unchanged) so it
saves, loads and builds like any HF model:

    import mixres.models.navit                     # registers model_type "navit"
    model = AutoModel.from_config(NaViTConfig(dim=64, depth=2, heads=4, ...))
    model.save_pretrained(d); AutoModel.from_pretrained(d)
    out = model(images)                            # list of (C, H, W), or list of lists
    out.pooler_output  (B, dim)   attention-pooled latent, before mlp_head
    out.logits         (B, num_classes) = navit.mlp_head(pooler_output)
    out.last_hidden_state (1, N, dim)  every image's patch tokens packed along one
                       sequence (the flash-attention / Qwen2-VL convention: a "batch" of
                       one packed sequence); out.cu_seqlens (B+1,) says where each image
                       starts, out.grid_hw (B, 2) its patch grid. `out.unpack()` splits it.
    model(pixel_values=x)  x (B, C, H, W) same-size images, the usual HF call: outputs are
                       dense, last_hidden_state (B, h*w, dim), so mixres's loop and grouped
                       backends (and generic HF code) run NaViTModel like any vision model.

The forward runs packed (mixres.families.navit.packed_forward: varlen attention, no
padding); `model.navit(images)` is still vit-pytorch's own forward (logits only).
NaViT defines no pixel normalization: mixres uses mean = std = 0.5 per channel.

Presets `navit-b16` and `tiny-navit` (random init from a fixed seed, eval mode) are
registered with mixres.presets, and the model type with mixres.loading, on import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vit_pytorch import na_vit

from mixres.families.navit import packed_forward
from mixres.loading import MODEL_TYPES
from mixres.packing import PackedImages
from mixres.presets import register_preset

__all__ = ["NaViTConfig", "NaViTModel", "NaViTModelOutput", "navit_b16", "tiny_navit", "PRESETS"]


class NaViTConfig(PreTrainedConfig):
    """The arguments of `vit_pytorch.na_vit.NaViT` (defaults: the navit-b16 preset).

    image_size bounds the position embeddings: images up to image_size x image_size
    pixels (any aspect ratio inside it). token_dropout_prob is a float or None (a
    callable cannot be saved); it only acts in vit-pytorch's own training forward.
    """

    model_type = "navit"
    # the names generic HF tooling (and mixres.vision_utils) reads
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "depth", "num_attention_heads": "heads",
                     "intermediate_size": "mlp_dim", "num_channels": "channels"}

    image_size: int | list[int] | tuple[int, int] = 1024
    patch_size: int = 16
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    dim_head: int = 64
    channels: int = 3
    dropout: float = 0.0
    emb_dropout: float = 0.0
    token_dropout_prob: float | None = None

    def navit_kwargs(self) -> dict:
        size = self.image_size
        return dict(image_size=tuple(size) if isinstance(size, (list, tuple)) else size,
                    patch_size=self.patch_size, num_classes=self.num_classes, dim=self.dim,
                    depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim, dim_head=self.dim_head,
                    channels=self.channels, dropout=self.dropout, emb_dropout=self.emb_dropout,
                    token_dropout_prob=self.token_dropout_prob)


@dataclass
class NaViTModelOutput(BaseModelOutputWithPooling):
    """BaseModelOutputWithPooling with packed tokens, their offsets and the class logits."""

    logits: torch.FloatTensor | None = None
    cu_seqlens: torch.Tensor | None = None
    grid_hw: torch.Tensor | None = None

    def unpack(self) -> list[torch.Tensor]:
        """Each image's (h*w, dim) patch tokens."""
        lens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        return list(torch.split(self.last_hidden_state.flatten(0, 1), lens))


# vit-pytorch's own initialization (torch defaults, randn embeddings), not HF's normal(0.02):
# post_init re-runs it, and from_pretrained runs it only on weights missing from a checkpoint

def _init_linear(m: nn.Linear):
    init.kaiming_uniform_(m.weight, a=math.sqrt(5))
    if m.bias is not None:
        bound = 1 / math.sqrt(m.in_features)
        init.uniform_(m.bias, -bound, bound)


def _init_norm(m: nn.Module):
    init.ones_(m.gamma)
    if isinstance(getattr(m, "beta", None), torch.Tensor):
        init.zeros_(m.beta)


def _init_navit(m: na_vit.NaViT):
    for p in (m.pos_embed_height, m.pos_embed_width, m.attn_pool_queries):
        init.normal_(p)


_INIT = {nn.Linear: _init_linear, na_vit.LayerNorm: _init_norm, na_vit.RMSNorm: _init_norm,
         na_vit.NaViT: _init_navit}


def _flatten(images) -> list[torch.Tensor]:
    """vit-pytorch's inputs (list of CHW, or list of lists = groups) -> one flat list."""
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    flat = [img for group in images for img in (group if isinstance(group, (list, tuple)) else [group])]
    if not flat:
        raise ValueError("NaViTModel: got no images")
    return flat


class NaViTModel(PreTrainedModel):
    """transformers wrapper of vit-pytorch's NaViT; `self.navit` is the unmodified module."""

    config_class = NaViTConfig
    main_input_name = "images"
    _no_split_modules = ["Attention"]  # vit_pytorch.na_vit.Attention blocks

    def __init__(self, config: NaViTConfig):
        super().__init__(config)
        self.navit = na_vit.NaViT(**config.navit_kwargs())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        fn = _INIT.get(type(module))
        if fn is not None:
            fn(module)

    @property
    def patch_size(self) -> int:
        return self.navit.patch_size

    def forward(self, images=None, *, pixel_values: torch.Tensor | None = None, select_layer: int = -1,
                output_hidden_states: bool = False, return_dict: bool = True, **kwargs) -> NaViTModelOutput:
        """images: list of (C, H, W) tensors (H, W multiples of the patch size), or list of lists;
        or pixel_values (B, C, H, W), a batch of same-size images (the usual HF input).

        select_layer -1: final-norm tokens, pooled latent and logits; other values give
        HF `hidden_states[select_layer]` tokens (no norm) with pooler_output/logits None.
        output_hidden_states: `hidden_states`, a tuple of (1, N, dim) packed tensors: the
        embeddings, then each block's output (the last one before the final norm, as HF).
        """
        if (images is None) == (pixel_values is None):
            raise ValueError("NaViTModel: pass either images (a list of (C, H, W)) or pixel_values "
                             "(B, C, H, W), not both or neither")
        flat = _flatten(images if images is not None else pixel_values)
        p = next(self.parameters())
        packed = PackedImages.from_images(flat, self.navit.patch_size).to(p.device, p.dtype)
        hidden = [] if output_hidden_states else None
        tokens, pooled = packed_forward(self.navit, packed, select_layer, hidden)
        logits = self.navit.mlp_head(pooled) if pooled is not None else None

        def layout(t):  # same-size pixel_values: HF's dense (B, n, dim); a mixed list: packed (1, N, dim)
            return t.reshape(len(flat), -1, t.shape[-1]) if pixel_values is not None else t[None]

        out = NaViTModelOutput(last_hidden_state=layout(tokens), pooler_output=pooled, logits=logits,
                               hidden_states=tuple(map(layout, hidden)) if hidden else None,
                               cu_seqlens=packed.cu_seqlens, grid_hw=packed.grid_hw)
        return out if return_dict else out.to_tuple()


AutoConfig.register("navit", NaViTConfig, exist_ok=True)
AutoModel.register(NaViTConfig, NaViTModel, exist_ok=True)


# presets: random init from a fixed seed, without touching the caller's RNG

PRESETS = {
    "navit-b16": dict(image_size=1024, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12,
                      mlp_dim=3072, dim_head=64),
    "tiny-navit": dict(image_size=1024, patch_size=16, num_classes=10, dim=64, depth=2, heads=4,
                       mlp_dim=128, dim_head=16),
}


def _build(name: str, seed: int = 0) -> NaViTModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NaViTModel(NaViTConfig(**PRESETS[name]))
    return model.eval()


def navit_b16() -> NaViTModel:
    """NaViT-B/16 (ViT-B sizes), images up to 1024x1024, random weights (seed 0)."""
    return _build("navit-b16")


def tiny_navit() -> NaViTModel:
    """Test-sized NaViT (dim 64, 2 blocks, 4 heads), images up to 1024x1024, random weights (seed 0)."""
    return _build("tiny-navit")


MODEL_TYPES.register("navit", NaViTConfig)
register_preset("navit-b16")(navit_b16)
register_preset("tiny-navit")(tiny_navit)
