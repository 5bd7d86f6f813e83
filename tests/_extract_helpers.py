"""Test-only pieces for tests/test_extract.py, also run as the child process of its
subprocess tests (`python tests/_extract_helpers.py MODEL_DIR INPUT OUT [key=value ...]`,
or under torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixres.encoders import Encoder, register_backend  # noqa: E402
from mixres.packing import PackedFeatures, PackedImages, seqlens_to_cu  # noqa: E402


@register_backend("test-loop")
class LoopForTests(Encoder):
    """The unmodified HF model run on each image alone (the reference the contract names)."""

    def forward(self, packed: PackedImages) -> PackedFeatures:
        toks, pooled = [], []
        for img in packed.unpack():
            o = self.model(pixel_values=img[None], interpolate_pos_encoding=True,
                           output_hidden_states=self.select_layer != -1)
            h = o.last_hidden_state if self.select_layer == -1 else o.hidden_states[self.select_layer]
            toks.append(h[0])
            pooled.append(o.pooler_output[0])
        lens = [t.shape[0] for t in toks]
        return PackedFeatures(torch.cat(toks), seqlens_to_cu(lens), packed.grid_hw,
                              self.num_prefix, torch.stack(pooled))


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    image_size=64, patch_size=16)
    return ViTModel(cfg).eval()


def child_main(argv: list[str]) -> int:
    from transformers import ViTModel

    from mixres.extract import embed

    model_dir, inp, out, *rest = argv
    kw = {k: (int(v) if v.lstrip("-").isdigit() else v) for k, v in (a.split("=", 1) for a in rest)}
    model = ViTModel.from_pretrained(model_dir).eval()
    kw = {"backend": "test-loop", "model_name": model_dir, "progress": False, **kw}
    embed(inp, out, model, **kw)
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
