"""mixres.vlm: a vision-language model wrapper on packed, never padded, mixed-size images.

Every image brings as many tokens as its grid has (a quarter with merge2x2), samples
hold any number of images, and the tokens flow encoder -> adapter -> LM as one packed
sequence with offsets. Parts come from registries (vision towers, adapters, strategies,
decoder blocks); `VLMConfig` documents the knobs.

    from mixres.vlm import build_vlm
    vlm = build_vlm({"encoder": "tiny-vit", "adapter": "merge2x2", "strategy": "joint_decoder",
                     "lm": "tiny", "freeze": {"encoder": True}})       # or a TOML path
    batch = vlm.collate([{"images": [img_a], "text": "<image> a cat"},
                         {"images": [img_b, img_c], "prompt": "<image> vs <image>?",
                          "response": "the left one"}])
    out = vlm(batch)        # out.loss, out.logits (T_text, V), out.cu_seqlens (B+1,)
    out.loss.backward()
    vlm.generate([img_a], "What is it?", max_new_tokens=16)

From a training run: `mixres.vlm.load_run("run/")` (its config and latest weights).
For token-budget batches: `vlm.collator.num_positions(sample)` + `mixres.pack_into_bins`.
"""

from mixres.vlm.adapters import Adapter, build_adapter
from mixres.vlm.build import build_lm, build_vlm
from mixres.vlm.config import VLMConfig
from mixres.vlm.data import Collator, VLMBatch
from mixres.vlm.layout import IGNORE, IMAGE, IMAGE_TOKEN, TEXT, ImageLayout
from mixres.vlm.lm import CausalLM, KVCache, LMConfig, SeqContext
from mixres.vlm.model import VLM, VLMOutput, apply_freeze
from mixres.vlm.registry import (
    ADAPTERS,
    BLOCKS,
    STRATEGIES,
    TOWERS,
    register_adapter,
    register_block,
    register_strategy,
    register_tower,
)
from mixres.vlm.strategies import ModalityStrategy, build_strategy
from mixres.vlm.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from mixres.vlm.vision import EncoderTower, RandomTower, build_tower

__all__ = ["build_vlm", "VLMConfig", "VLM", "VLMOutput", "VLMBatch", "Collator", "apply_freeze",
           "Adapter", "build_adapter", "build_lm", "CausalLM", "LMConfig", "KVCache", "SeqContext",
           "ModalityStrategy", "build_strategy", "ImageLayout",
           "ByteTokenizer", "HFTokenizer", "load_tokenizer",
           "EncoderTower", "RandomTower", "build_tower", "TOWERS", "ADAPTERS", "STRATEGIES",
           "BLOCKS", "register_tower", "register_adapter", "register_strategy", "register_block",
           "IGNORE", "TEXT", "IMAGE", "IMAGE_TOKEN", "load_run"]


def __getattr__(name):
    # load_run reads training checkpoints; imported on use so model parts never load training
    if name == "load_run":
        from mixres.vlm.training.inference import load_run

        return load_run
    raise AttributeError(f"module 'mixres.vlm' has no attribute {name!r}")
