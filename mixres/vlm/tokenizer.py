"""Tokenizers for the VLM: a file-free byte tokenizer and HF tokenizers from a local path.

Both expose the same small surface the collator and `generate` need:
    encode(text) -> list[int]   the literal "<image>" becomes `image_token_id`
    decode(ids) -> str          special tokens dropped
    vocab_size, image_token_id, bos_id, eos_id, pad_id (pad is never used for packing)
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["IMAGE_TOKEN", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]

IMAGE_TOKEN = "<image>"


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus four specials: <pad> 256, <bos> 257, <eos> 258, <image> 259.

    Needs no files, so tests and demos run anywhere. Special tokens other than
    `<image>` are not parsed from text (a user typing "<eos>" gets bytes).
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", IMAGE_TOKEN)

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id, self.image_token_id = range(256, 260)
        self.vocab_size = 260

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(self.image_token_id)
            ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260)"


class HFTokenizer:
    """An HF tokenizer (AutoTokenizer from a local path) with `<image>` added if missing.

    `grew` says whether `<image>` had to be added, in which case the language model's
    embeddings must be resized to `vocab_size` (build_vlm does it).
    """

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise ValueError(f"tokenizer {str(path)!r} could not be loaded ({e}); give tokenizer='bytes' "
                             f"or a directory with tokenizer files") from e
        before = len(self.tok)
        if IMAGE_TOKEN not in self.tok.get_vocab():
            self.tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.grew = len(self.tok) != before
        self.image_token_id = self.tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id
        self._split = re.compile(re.escape(IMAGE_TOKEN))

    def encode(self, text: str) -> list[int]:
        # split on "<image>" ourselves so it maps to exactly one id whatever the
        # tokenizer's pre-tokenizer does with the surrounding spaces
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i:
                ids.append(self.image_token_id)
            if part:
                ids.extend(self.tok.encode(part, add_special_tokens=False))
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tok).__name__}, vocab_size={self.vocab_size})"


def load_tokenizer(spec) -> ByteTokenizer | HFTokenizer:
    """"bytes" -> ByteTokenizer; a local directory -> HFTokenizer; a tokenizer object as is."""
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    if isinstance(spec, (str, Path)):
        if not Path(spec).is_dir():
            raise ValueError(f"tokenizer {spec!r}: expected 'bytes' or a local directory with "
                             f"tokenizer files (no downloads)")
        return HFTokenizer(spec)
    if hasattr(spec, "encode") and hasattr(spec, "image_token_id"):
        return spec
    raise TypeError(f"tokenizer: expected 'bytes', a path or a tokenizer, got {type(spec).__name__}")
