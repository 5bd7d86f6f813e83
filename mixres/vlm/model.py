"""The VLM: vision tower -> adapter -> strategy -> language model, on packed batches.

    vlm = build_vlm({"encoder": "random", "adapter": "mlp2", "strategy": "joint_decoder"})
    batch = vlm.collate([{"images": [img], "text": "<image> a cat"}, ...])
    out = vlm(batch)          # out.logits (T_text, V), out.cu_seqlens (B+1,), out.loss
    vlm.generate([img], "What is it?", max_new_tokens=16)

State-dict layout: `encoder.*`, `adapter.*`, `lm.*` only. The strategy and the tokenizer
are plain attributes (no weights, not submodules), so FSDP / DCP see three ordinary
modules and a strategy swap never changes checkpoint keys of the parts it shares.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mixres.vlm.data import Collator, VLMBatch
from mixres.vlm.interfaces import LanguageModel, Tokenizer, Tower, conforms, missing_members
from mixres.vlm.layout import TEXT, target_mask

__all__ = ["VLM", "VLMOutput", "apply_freeze"]


@dataclass
class VLMOutput:
    """logits (T_text, V) at the text positions of all samples, packed; cu_seqlens (B+1,)
    offsets of each sample's rows in logits; loss (mean over the batch's trained tokens, so
    long samples weigh more, as in packed pretraining) or None when nothing is trained on."""

    logits: torch.Tensor
    cu_seqlens: torch.Tensor
    loss: torch.Tensor | None = None

    def unpack(self) -> list[torch.Tensor]:
        return list(torch.split(self.logits, (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()))


def apply_freeze(model: nn.Module, spec: dict[str, bool]) -> None:
    """Set requires_grad from {module or parameter path: frozen}; the longest path wins.

    Every path must name a module or parameter of `model` ("" is the whole model);
    parameters no path covers are left as they are.
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for path in spec:
        if path not in modules and path not in params:
            near = difflib.get_close_matches(path, list(modules) + list(params), n=3)
            raise ValueError(f"freeze: {path!r} names no module or parameter of the VLM; "
                             f"close matches: {near}")
    for name, p in params.items():
        best = None
        for path, frozen in spec.items():
            if path == "" or name == path or name.startswith(path + "."):
                if best is None or len(path) > len(best[0]):
                    best = (path, frozen)
        if best is not None:
            p.requires_grad_(not best[1])


class VLM(nn.Module):
    def __init__(self, encoder: nn.Module, adapter: nn.Module, lm: nn.Module, strategy, tokenizer,
                 *, config=None, min_image_tokens: int = 1, max_image_tokens: int | None = 1024,
                 max_seq_tokens: int | None = None):
        super().__init__()
        for part, proto in ((encoder, Tower), (lm, LanguageModel), (tokenizer, Tokenizer)):
            if not conforms(part, proto):
                raise TypeError(f"VLM: {type(part).__name__} is not a {proto.__name__} "
                                f"(mixres.vlm.interfaces); it lacks {missing_members(part, proto)}")
        self.encoder, self.adapter, self.lm = encoder, adapter, lm
        # plain attributes: no weights, invisible to state_dict / FSDP / DCP
        self.__dict__["strategy"] = strategy
        self.__dict__["tokenizer"] = tokenizer
        self.__dict__["config"] = config
        self.__dict__["collator"] = Collator(tokenizer,
                                             adapter.layout(encoder, min_image_tokens, max_image_tokens),
                                             strategy.expands_images, max_seq_tokens=max_seq_tokens,
                                             adapter_name=getattr(adapter, "name", type(adapter).__name__))

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def collate(self, samples, add_eos: bool = True) -> VLMBatch:
        return self.collator(samples, add_eos=add_eos)

    def blocks(self) -> list[nn.Module]:
        """The tower's and the LM's blocks, as each names them: what activation
        checkpointing recomputes, torch.compile compiles and FSDP2 shards one by one."""
        return [*self.encoder.blocks, *self.lm.blocks]

    def image_tokens(self, batch: VLMBatch) -> torch.Tensor | None:
        """(N, D_lm) LM tokens of all images of the batch, in order (tower + adapter)."""
        if batch.images is None:
            return None
        feats = self.adapter(self.encoder(batch.images.to(self.device)))
        got = feats.seqlens.tolist()
        if got != batch.image_token_counts:
            raise ValueError(f"the adapter gave {got} tokens per image, the collator planned "
                             f"{batch.image_token_counts}")
        return feats.tokens

    def forward(self, batch: VLMBatch) -> VLMOutput:
        batch = batch.to(self.device)
        h = self.strategy.forward(self.lm, batch, self.image_tokens(batch))
        rows = batch.text_positions
        tgt = None
        if batch.labels is not None:
            tgt = target_mask(batch.labels, batch.position_ids).nonzero().squeeze(1)
        if tgt is None or not tgt.numel():
            return VLMOutput(self.lm.head(h[rows]), batch.text_cu_seqlens, None)
        # one head call over every row either output needs: the text rows (logits) and the
        # rows that predict a target (the loss), which are mostly the same rows
        needed, where = torch.unique(torch.cat([rows, tgt - 1]), return_inverse=True)
        out = self.lm.head(h[needed])
        n = rows.numel()
        loss = F.cross_entropy(out[where[n:]].float(), batch.labels[tgt])
        return VLMOutput(out[where[:n]], batch.text_cu_seqlens, loss)

    # generation

    @staticmethod
    def _append(batch: VLMBatch, token: int) -> VLMBatch:
        """The one-sample batch with one more text token at its end."""
        dev = batch.input_ids.device
        one = torch.ones(1, dtype=torch.long, device=dev)
        n = batch.num_tokens
        return replace(batch, input_ids=torch.cat([batch.input_ids, one * token]),
                       cu_seqlens=batch.cu_seqlens + torch.tensor([0, 1], device=dev, dtype=torch.int32),
                       max_seqlen=n + 1, position_ids=torch.cat([batch.position_ids, one * n]),
                       modality_ids=torch.cat([batch.modality_ids, one * TEXT]),
                       text_positions=torch.cat([batch.text_positions, one * n]), labels=None)

    @staticmethod
    def _step(batch: VLMBatch, token: int, position: int) -> VLMBatch:
        """A decode step: only the new token, at `position`, of the one sample."""
        dev = batch.input_ids.device
        one = torch.ones(1, dtype=torch.long, device=dev)
        return replace(batch, input_ids=one * token,
                       cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device=dev), max_seqlen=1,
                       position_ids=one * position, modality_ids=one * TEXT,
                       image_positions=one[:0], text_positions=one * 0, labels=None)

    @torch.no_grad()
    def generate_ids(self, images, prompt: str, max_new_tokens: int = 32,
                     use_cache: bool = True) -> list[int]:
        """Greedy decoding of one sample; returns the new token ids (up to and without <eos>).

        use_cache=False re-runs the whole packed sequence at every step (the reference the
        cached path is tested against). Every LM decodes through the same mixres KV cache
        (`lm.new_cache()`); an LM that has none (an HF family mixres does not run layer by
        layer) re-runs the sequence."""
        images = list(images) if images is not None else []
        batch = self.collate([{"images": images, "prompt": prompt, "response": ""}],
                             add_eos=False).to(self.device)
        img = self.image_tokens(batch)
        eos = self.tokenizer.eos_id
        cache = self.lm.new_cache() if use_cache else None
        use_cache = cache is not None
        h = self.strategy.forward(self.lm, batch, img, cache)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(self.lm.head(h[-1]).argmax())
            if token == eos:
                break
            out.append(token)
            if use_cache:
                step = self._step(batch, token, batch.num_tokens + len(out) - 1)
                h = self.strategy.forward(self.lm, step, img, cache)
            else:
                batch = self._append(batch, token)
                h = self.strategy.forward(self.lm, batch, img)
        return out

    def generate(self, images, prompt: str, max_new_tokens: int = 32, use_cache: bool = True) -> str:
        """Greedy decoding of one sample (images: a list of images, prompt: text) -> text."""
        return self.tokenizer.decode(self.generate_ids(images, prompt, max_new_tokens, use_cache))

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, tokenizer={self.tokenizer!r}"
