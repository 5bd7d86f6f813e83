"""Samples -> one packed VLM batch: images as PackedImages, all text in one sequence.

A sample is `{"images": [...], "text": "..."}` (loss on every text token),
`{"images": [...], "prompt": "...", "response": "..."}` (loss on the response and the
final <eos> only) or `{"images": [...], "conversations": [{"from": "human", "value":
...}, {"from": "gpt", "value": ...}, ...]}` (LLaVA; loss on the assistant turns only,
rendered with the tokenizer's chat template where it has one: mixres.vlm.chat).
Images are anything `mixres.preprocess.Preprocessor` takes: (C, H, W) float tensors
already resized and normalized (validated), PIL images, paths, bytes, numpy arrays or
tensors of pixels (decoded by the chosen decoder, `decode` = the training TOML's
`data.decode`, and resized to the encoder's patch size, mean and std). With a grid-merging
adapter the resize unit is `grid_multiple` patches, so every grid side stays even. The
collator holds plain values only (`mixres.vlm.layout.ImageLayout`, its Preprocessor and
the tokenizer), so it pickles cheaply into DataLoader workers.

Layout of sample i in the packed sequence: <bos>, its text with each `<image>`
placeholder expanded to the tokens its image brings (or, with no placeholder, the
images first, right after <bos>), <eos>. Strategies that keep images out of the
sequence (cross_attention) keep the placeholder as one text token instead.
Nothing is padded: every tensor is as long as the real content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from mixres.packing import PackedImages, seqlens_to_cu
from mixres.vlm.chat import conversation_segments
from mixres.vlm.layout import IGNORE, IMAGE, TEXT, ImageLayout

__all__ = ["VLMBatch", "Collator", "TEXT", "IMAGE", "IGNORE"]


@dataclass
class VLMBatch:
    """A packed batch of B samples (T positions in all, N image tokens in all).

    input_ids          (T,) token ids; image positions hold the image token id
    cu_seqlens         (B+1,) int32 offsets of each sample in the sequence
    max_seqlen         longest sample
    position_ids       (T,) restart at 0 for every sample
    modality_ids       (T,) TEXT or IMAGE
    image_positions    (N,) where the image tokens go, in image order (empty when the
                       strategy keeps images out of the sequence)
    text_positions     (T_text,) the text positions, sample by sample (what .logits covers)
    text_cu_seqlens    (B+1,) int32 offsets of each sample's text positions
    labels             (T,) target token at each position, IGNORE on images, prompts, <bos>
    images             PackedImages of every sample's images in order, or None
    image_token_counts tokens each image brings after the adapter, in image order
    images_per_sample  how many images each sample holds
    image_token_cu     (B+1,) int32 offsets of each sample's image tokens among all of them
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    modality_ids: torch.Tensor
    image_positions: torch.Tensor
    text_positions: torch.Tensor
    text_cu_seqlens: torch.Tensor
    labels: torch.Tensor | None
    images: PackedImages | None
    image_token_counts: list[int]
    images_per_sample: list[int]
    image_token_cu: torch.Tensor

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device) -> VLMBatch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device) if isinstance(v, (torch.Tensor, PackedImages)) else v
        return VLMBatch(**moved)


class Collator:
    """Turns samples into a VLMBatch: the tokenizer, the image layout (plain values), and
    whether image tokens take LM positions (`expands_images`, from the strategy)."""

    def __init__(self, tokenizer, layout: ImageLayout, expands_images: bool, *,
                 max_seq_tokens: int | None = None, adapter_name: str = "adapter", decode: str = "pil"):
        self.tok, self.layout = tokenizer, layout
        self.expands_images = expands_images
        self.max_seq_tokens = max_seq_tokens
        self.adapter_name = adapter_name
        self.decode = decode

    @property
    def decode(self) -> str:
        """The decoder of images given as files, bytes or PIL images ("pil" | "fast" | "cuda")."""
        return self.preprocessor.decode

    @decode.setter
    def decode(self, name: str) -> None:
        from mixres.preprocess import Preprocessor

        lay = self.layout
        lo, hi = lay.unit_bounds()  # the token bounds in resize units
        self.preprocessor = Preprocessor(patch_size=lay.patch_size, unit=lay.unit,
                                         mean_std=(lay.mean, lay.std), min_image_tokens=lo,
                                         max_image_tokens=hi, decode=name, ready_bounds=True)

    @property
    def min_image_tokens(self) -> int:
        return self.layout.min_image_tokens

    @property
    def max_image_tokens(self) -> int | None:
        return self.layout.max_image_tokens

    # images

    def prepare_image(self, image, where: str) -> torch.Tensor:
        """One image -> a normalized (C, H, W) tensor whose grid sides are multiples of the
        layout's grid_multiple (token bounds are in encoder patches)."""
        lay = self.layout
        try:
            return self.preprocessor(image)
        except ValueError as e:
            # the grid hint only where the grid rule is what failed: a ready tensor whose
            # sides are not multiples of the resize unit
            grid_error = (isinstance(image, torch.Tensor) and lay.grid_multiple > 1 and image.ndim == 3
                          and all(s % lay.patch_size == 0 for s in image.shape[1:])
                          and any(s % lay.unit for s in image.shape[1:]))
            extra = (f" (the {self.adapter_name} adapter needs grids in multiples of "
                     f"{lay.grid_multiple} patches of {lay.patch_size} px)") if grid_error else ""
            raise ValueError(f"{where}: {e}{extra}") from e

    def _add_image(self, image, where: str, pixels: list) -> int:
        """Prepare one image, append it to `pixels`; the LM tokens it will bring."""
        pixels.append(self.prepare_image(image, where))
        p = self.layout.patch_size
        return self.layout.tokens((pixels[-1].shape[1] // p, pixels[-1].shape[2] // p))

    # text

    def _body(self, sample: dict, where: str) -> list[tuple[int, bool]]:
        tok = self.tok
        if "text" in sample:
            return [(i, True) for i in tok.encode(sample["text"])]
        if "prompt" in sample and "response" in sample:
            return ([(i, False) for i in tok.encode(sample["prompt"])]
                    + [(i, True) for i in tok.encode(sample["response"])])
        if "conversations" in sample:
            return [(i, trained) for text, trained in
                    conversation_segments(tok, sample["conversations"], f"{where} conversations")
                    for i in tok.encode(text)]
        raise ValueError(f"{where}: expected a 'text' key, 'prompt' and 'response' keys or "
                         f"'conversations', got {sorted(sample)}")

    def text_ids(self, sample: dict, where: str = "sample", add_eos: bool = True,
                 num_images: int | None = None) -> tuple[list[int], list[bool]]:
        """Token ids (with <bos>, <eos>, one placeholder per image) and which are trained on."""
        tok = self.tok
        body = self._body(sample, where)
        n_img = len(sample.get("images") or []) if num_images is None else num_images
        n_ph = sum(i == tok.image_token_id for i, _ in body)
        if n_ph == 0 and n_img:
            body = [(tok.image_token_id, False)] * n_img + body
        elif n_ph != n_img:
            raise ValueError(f"{where}: the text has {n_ph} <image> placeholders but the sample has "
                             f"{n_img} images")
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + [i for i, _ in body]
        train = ([False] if tok.bos_id is not None else []) + [t for _, t in body]
        if add_eos and tok.eos_id is not None:
            # <eos> is always trained on: the model learns where a text or a response ends
            ids.append(tok.eos_id)
            train.append(True)
        return ids, train

    def length_from_sizes(self, sample: dict, sizes: list[tuple[int, int]]) -> int:
        """The LM positions `sample` takes, from its images' (height, width) alone."""
        toks, _ = self.text_ids(sample, num_images=len(sizes))
        n = len(toks) - len(sizes)
        if not self.expands_images:
            return n + len(sizes)
        return n + sum(self.layout.tokens_for_size(h, w) for h, w in sizes)

    def num_positions(self, sample: dict, add_eos: bool = True) -> int:
        """The LM positions `sample` takes once collated (for token-budget batching with
        `mixres.pack_into_bins`); images are preprocessed but not patchified."""
        toks, _ = self.text_ids(sample, "sample", add_eos)
        images = list(sample.get("images") or [])
        n = len(toks) - len(images)
        if self.expands_images:
            p = self.layout.patch_size
            for k, image in enumerate(images):
                t = self.prepare_image(image, f"sample image {k}")
                n += self.layout.tokens((t.shape[1] // p, t.shape[2] // p))
        else:
            n += len(images)
        return n

    # batch

    def __call__(self, samples: Sequence[dict], add_eos: bool = True) -> VLMBatch:
        """Pack samples; `add_eos=False` leaves each sample open for generation."""
        if isinstance(samples, dict):
            samples = [samples]
        if not samples:
            raise ValueError("collate: got no samples")
        img_id = self.tok.image_token_id
        pixels, counts, per_sample = [], [], []
        ids, labels, modality, lengths = [], [], [], []
        for s, sample in enumerate(samples):
            where = f"sample {s}"
            if not isinstance(sample, dict):
                raise TypeError(f"{where}: expected a dict with 'images' and 'text' (or 'prompt' and "
                                f"'response', or 'conversations'), got {type(sample).__name__}")
            images = list(sample.get("images") or [])
            toks, train = self.text_ids(sample, where, add_eos)
            start = len(ids)
            img_iter = iter(range(len(images)))
            for t, tr in zip(toks, train):
                if t != img_id:
                    ids.append(t)
                    modality.append(TEXT)
                    labels.append(t if tr else IGNORE)
                    continue
                k = next(img_iter)
                n = self._add_image(images[k], f"{where} image {k}", pixels)
                counts.append(n)
                if self.expands_images:
                    ids += [img_id] * n
                    modality += [IMAGE] * n
                    # the token after an image block is predicted from its last position
                    labels += [IGNORE] * n
                else:  # cross-attention: the placeholder stays one text token, images go aside
                    ids.append(t)
                    modality.append(TEXT)
                    labels.append(IGNORE)
            per_sample.append(len(images))
            lengths.append(len(ids) - start)
            if self.max_seq_tokens is not None and lengths[-1] > self.max_seq_tokens:
                raise ValueError(f"{where}: {lengths[-1]} LM positions exceed max_seq_tokens "
                                 f"{self.max_seq_tokens}; use fewer/smaller images or a larger budget")
        ids_t = torch.tensor(ids, dtype=torch.long)
        mod_t = torch.tensor(modality, dtype=torch.long)
        lens_t = torch.tensor(lengths)
        cu = seqlens_to_cu(lens_t)
        pos = torch.arange(len(ids)) - torch.repeat_interleave(cu[:-1].long(), lens_t)
        is_text = mod_t == TEXT
        text_lens = torch.stack([is_text[a:b].sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
        img_counts_per_sample = []
        it = iter(counts)
        for n in per_sample:
            img_counts_per_sample.append(sum(next(it) for _ in range(n)))
        lab = torch.tensor(labels, dtype=torch.long)
        return VLMBatch(
            input_ids=ids_t, cu_seqlens=cu, max_seqlen=int(lens_t.max()), position_ids=pos,
            modality_ids=mod_t, image_positions=(~is_text).nonzero().squeeze(1),
            text_positions=is_text.nonzero().squeeze(1), text_cu_seqlens=seqlens_to_cu(text_lens),
            labels=lab if bool((lab != IGNORE).any()) else None,
            images=PackedImages.from_images(pixels, self.layout.patch_size) if pixels else None,
            image_token_counts=counts, images_per_sample=per_sample,
            image_token_cu=seqlens_to_cu(img_counts_per_sample))
