"""mixres.vlm: a vision-language model wrapper on packed, never padded, mixed-size images.

Every image brings as many tokens as its grid has, samples hold any number of images,
and the tokens flow encoder -> adapter -> LM as one packed sequence with offsets.
Parts come from registries (encoders, adapters, strategies, decoder blocks); see
`build_vlm` and `VLMConfig` for the knobs.
"""

from mixres.vlm.adapters import Adapter, build_adapter
from mixres.vlm.build import build_lm, build_vlm
from mixres.vlm.config import VLMConfig
from mixres.vlm.data import IGNORE, IMAGE, TEXT, Collator, VLMBatch
from mixres.vlm.lm import Decoder, DecoderConfig, KVCache, SeqContext
from mixres.vlm.model import VLM, VLMOutput, apply_freeze
from mixres.vlm.registry import (
           ADAPTERS,
           BLOCKS,
           ENCODERS,
           STRATEGIES,
           register_adapter,
           register_block,
           register_encoder,
           register_strategy,
)
from mixres.vlm.strategies import ModalityStrategy, build_strategy
from mixres.vlm.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from mixres.vlm.vision import MixresEncoder, RandomEncoder, build_tower

__all__ = ["build_vlm", "VLMConfig", "VLM", "VLMOutput", "VLMBatch", "Collator", "apply_freeze",
           "Adapter", "build_adapter", "build_lm", "Decoder", "DecoderConfig", "KVCache", "SeqContext",
           "ModalityStrategy", "build_strategy", "ByteTokenizer", "HFTokenizer", "load_tokenizer",
           "MixresEncoder", "RandomEncoder", "build_tower", "ENCODERS", "ADAPTERS", "STRATEGIES",
           "BLOCKS", "register_encoder", "register_adapter", "register_strategy", "register_block",
           "IGNORE", "TEXT", "IMAGE"]
