"""Tokenizers for the VLM: a file-free byte tokenizer and HF tokenizers from a local path.

Both meet `mixres.vlm.interfaces.Tokenizer`:
    encode(text) -> list[int]   the literal "<image>" becomes `image_token_id`
    encode_with_offsets(text)   ids and each token's (start, end) character span, from one
                                tokenization (content accuracy maps word spans with it)
    decode(ids) -> str          special tokens dropped
    chat_template, render_chat  the HF tokenizer's chat template (None for bytes)
    vocab_size, image_token_id, bos_id, eos_id, pad_id (pad is never used for packing)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mixres.vlm.interfaces import Tokenizer, conforms
from mixres.vlm.layout import IMAGE_TOKEN

__all__ = ["IMAGE_TOKEN", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "has_tokenizer_files"]

# any of these in a directory means it holds a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


def has_tokenizer_files(path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus four specials: <pad> 256, <bos> 257, <eos> 258, <image> 259.

    Needs no files, so tests and demos run anywhere. Special tokens other than
    `<image>` are not parsed from text (a user typing "<eos>" gets bytes).
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", IMAGE_TOKEN)
    chat_template = None

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id, self.image_token_id = range(256, 260)
        self.vocab_size = 260

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for i, part in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(self.image_token_id)
                spans.append((pos, pos + len(IMAGE_TOKEN)))
                pos += len(IMAGE_TOKEN)
            for ch in part:
                b = ch.encode("utf-8")
                ids.extend(b)
                spans.extend([(pos, pos + 1)] * len(b))
                pos += 1
        return ids, spans

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
        raise ValueError("the byte tokenizer has no chat template")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260)"


class HFTokenizer:
    """An HF tokenizer (AutoTokenizer from a local path or hub id) with `<image>` added if
    missing. `grew` says whether `<image>` had to be added, in which case the language
    model's embeddings must be resized to `vocab_size` (build_vlm does it)."""

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"tokenizer {str(path)!r} could not be loaded ({first}); give "
                             f"tokenizer='bytes' or a directory with tokenizer files") from e
        before = len(self.tok)
        if IMAGE_TOKEN not in self.tok.get_vocab():
            self.tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.grew = len(self.tok) != before
        self.image_token_id = self.tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.vocab_size = len(self.tok)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id
        self.chat_template = getattr(self.tok, "chat_template", None) or None
        self._split = re.compile(re.escape(IMAGE_TOKEN))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # split on "<image>" ourselves so it maps to exactly one id whatever the
        # tokenizer's pre-tokenizer does with the surrounding spaces
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for i, part in enumerate(self._split.split(text)):
            if i:
                ids.append(self.image_token_id)
                spans.append((pos, pos + len(IMAGE_TOKEN)))
                pos += len(IMAGE_TOKEN)
            if part:
                enc = self.tok(part, add_special_tokens=False, return_offsets_mapping=True)
                ids.extend(enc["input_ids"])
                spans.extend((pos + a, pos + b) for a, b in enc["offset_mapping"])
            pos += len(part)
        return ids, spans

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i:
                ids.append(self.image_token_id)
            if part:
                ids.extend(self.tok.encode(part, add_special_tokens=False))
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tok).__name__}, vocab_size={self.vocab_size})"


def load_tokenizer(spec, *, lm_path=None) -> Tokenizer:
    """"bytes" -> ByteTokenizer; a local directory or hub id -> HFTokenizer; a tokenizer
    object as is. spec None with `lm_path`: the LM's own tokenizer, or the byte tokenizer
    (with a one-line notice) when that directory holds no tokenizer files."""
    if spec is None and lm_path is not None:
        if Path(lm_path).is_dir() and not has_tokenizer_files(lm_path):
            print(f"mixres: {lm_path} has no tokenizer files; using the byte tokenizer "
                  f"(the LM's embeddings are resized to its 260 tokens if needed)", file=sys.stderr)
            return ByteTokenizer()
        spec = lm_path
    if spec is None or spec == "bytes":
        return ByteTokenizer()
    if isinstance(spec, (str, Path)):
        if not Path(spec).is_dir() and not _looks_like_hub_id(spec):
            raise ValueError(f"tokenizer {str(spec)!r}: expected 'bytes', a local directory with "
                             f"tokenizer files or a hub id")
        return HFTokenizer(spec)
    if conforms(spec, Tokenizer):
        return spec
    raise TypeError(f"tokenizer: expected 'bytes', a path or a tokenizer, got {type(spec).__name__}")


def _looks_like_hub_id(spec) -> bool:
    """'org/name' that is not a path on this machine (from_pretrained fetches or finds it in
    the local hub cache)."""
    s = str(spec)
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()
