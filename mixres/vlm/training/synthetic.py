"""A synthetic captioning task that proves a VLM learns to see: shapes on canvases of mixed size.

Each example is one image of a random size and aspect ratio (sides 24–192 px) showing one
shape of one colour at one of five positions, and a caption naming the three:

    prompt   "<image>:"
    response "red circle top-left"

The caption is a short fixed template so that with the byte tokenizer every content word
is a few tokens and nothing else needs learning. Without the image the best a model can
do is the prior: 1/6 for the colour, 1/4 for the shape and 1/5 for the position (mean
0.206, `CHANCE`), which is what the `--blank-images` baseline should show.

Every example is a pure function of (seed, index): workers, ranks and a resumed run all
see the same pixels, and the image size is known without drawing (`size`), so token
budgets can be planned before anything is rendered.

content_accuracy (mixres.vlm.training.metrics): under teacher forcing, the fraction of
content words (colour, shape, position) of the held-out captions whose every token is the
model's argmax prediction given the image, the prompt and the caption's preceding tokens.
`datasets(cfg)` is what the trainer calls for `[data] synthetic = N`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from mixres.vlm.training.metrics import word_spans

__all__ = ["COLOURS", "SHAPES", "POSITIONS", "CHANCE", "ShapeSpec", "SyntheticShapes", "render",
           "datasets", "synthetic_config", "SYNTHETIC_VLM", "save_tiny_llama"]

# names with distinct first bytes wherever possible: the first byte decides the word
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
# position name -> centre as a fraction of (width, height)
POSITIONS = {
    "top-left": (0.25, 0.25),
    "top-right": (0.75, 0.25),
    "bottom-left": (0.25, 0.75),
    "bottom-right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
CHANCE = (1 / len(COLOURS) + 1 / len(SHAPES) + 1 / len(POSITIONS)) / 3

PROMPT = "<image>:"  # ends with a text token, so the colour is predicted at a text row
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 24, 192, 3.0


class ShapeSpec(tuple):
    """(width, height, colour, shape, position, background grey level)"""

    __slots__ = ()

    def __new__(cls, width, height, colour, shape, position, grey):
        return super().__new__(cls, (width, height, colour, shape, position, grey))

    width = property(lambda s: s[0])
    height = property(lambda s: s[1])
    colour = property(lambda s: s[2])
    shape = property(lambda s: s[3])
    position = property(lambda s: s[4])
    grey = property(lambda s: s[5])

    @property
    def caption(self) -> str:
        return f"{self.colour} {self.shape} {self.position}"


def _spec(seed: int, index: int) -> ShapeSpec:
    rng = np.random.default_rng([seed, index])
    # log-uniform aspect ratio in [1/MAX_ASPECT, MAX_ASPECT], long side uniform
    while True:
        long_side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        aspect = math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT)))
        w, h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect),
                                                                             long_side)
        if MIN_SIDE <= min(w, h):
            break
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    grey = int(rng.integers(200, 256))
    return ShapeSpec(w, h, colour, shape, position, grey)


def render(spec: ShapeSpec, blank: bool = False) -> Image.Image:
    """The RGB image of `spec`; `blank=True` gives the same canvas with no shape."""
    w, h = spec.width, spec.height
    img = Image.new("RGB", (w, h), (spec.grey,) * 3)
    if blank:
        return img
    fx, fy = POSITIONS[spec.position]
    cx, cy = fx * w, fy * h
    # the shape fits its quadrant: radius a fraction of the short side
    r = 0.2 * min(w, h)
    draw = ImageDraw.Draw(img)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif spec.shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif spec.shape == "cross":
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")
    return img


class SyntheticShapes:
    """`n` examples drawn from `seed`; a held-out split is simply another seed.

    Item i -> {"images": [PIL image], "prompt": "<image>", "response": caption,
               "content_spans": [(start, end), ...] char spans into the response}
    `image_sizes(i)` gives [(height, width)] without drawing.
    """

    def __init__(self, n: int, seed: int = 0, blank_images: bool = False):
        if n < 1:
            raise ValueError(f"SyntheticShapes: n must be positive, got {n}")
        self.n, self.seed, self.blank_images = int(n), int(seed), bool(blank_images)

    def __len__(self) -> int:
        return self.n

    def spec(self, index: int) -> ShapeSpec:
        if not 0 <= index < self.n:
            raise IndexError(f"SyntheticShapes: index {index} out of range [0, {self.n})")
        return _spec(self.seed, index)

    def text_of(self, index: int) -> dict:
        """The item's text fields, known without drawing."""
        return {"prompt": PROMPT, "response": self.spec(index).caption}

    def image_sizes(self, index: int) -> list[tuple[int, int]]:
        s = self.spec(index)
        return [(s.height, s.width)]

    def __getitem__(self, index: int) -> dict:
        s = self.spec(index)
        return {"images": [render(s, blank=self.blank_images)], "prompt": PROMPT,
                "response": s.caption, "content_spans": word_spans(s.caption)}


def datasets(cfg) -> tuple[SyntheticShapes, SyntheticShapes]:
    """(train, held-out) of a run whose [data] table sets `synthetic`: the held-out split is
    drawn from another seed, so no training example is ever evaluated."""
    d, seed = cfg.data, cfg.train.seed
    return (SyntheticShapes(d.synthetic, seed=2 * seed, blank_images=d.blank_images),
            SyntheticShapes(d.synthetic_eval, seed=2 * seed + 1, blank_images=d.blank_images))


# the run of `mixres train --synthetic`: a tiny VLM trained from scratch. The encoder is a
# 2-layer ViT (the `random` stub has no attention across patches, so it cannot tell shapes
# apart) whose position table starts at a 2-D sine-cosine code (where a patch lies is
# visible from the first step); 36-64 patches per image, merged 2x2 into 9-16 LM tokens.
SYNTHETIC_VLM = {"encoder": {"name": "vit", "hidden": 64, "layers": 2, "heads": 4, "patch_size": 8,
                             "sincos": 0.3},
                 "adapter": "merge2x2", "lm": "tiny", "min_image_tokens": 36, "max_image_tokens": 64,
                 "max_seq_tokens": 512}
# tanh gates at Flamingo's 0 keep their gradient at noise level for as long as a minutes-long
# run lasts, so the synthetic run starts them open
SYNTHETIC_STRATEGIES = {"joint_decoder": "joint_decoder", "mot": "mot",
                        "cross_attention": {"name": "cross_attention", "gate_init": 1.0}}
# mot needs the stronger position code to separate shape from position in the time budget
SYNTHETIC_ENCODER = {"mot": {"sincos": 1.0}}
# cross_attention into an HF Llama at lr 3e-3 never starts reading the images (the colour
# word stays at chance for 1000+ steps, gates still open at 0.8, train loss at the text-only
# plateau); at 1e-3 the colour is read by step 250 (measured, mixres bench train-synthetic)
SYNTHETIC_HF_TRAIN = {"cross_attention": {"lr": 1e-3}}


def synthetic_config(strategy: str = "joint_decoder", blank: bool = False, steps: int = 4000,
                     lm=None) -> dict:
    """The training config of the synthetic shapes run (about 4 minutes on 2 CPU threads,
    ~25 images of 1024 tokens a step); `lm`: a local HF causal LM directory instead of the
    built-in tiny decoder."""
    encoder = {**SYNTHETIC_VLM["encoder"], **SYNTHETIC_ENCODER.get(strategy, {})}
    vlm = {**SYNTHETIC_VLM, "encoder": encoder, "strategy": SYNTHETIC_STRATEGIES.get(strategy, strategy)}
    train = {"steps": steps, "lr": 3e-3, "warmup": 50, "weight_decay": 0.01, "log_every": 50,
             "eval_every": 500, "grad_clip": 1.0, "min_lr_ratio": 0.05, "threads": 2}
    if lm is not None:
        vlm["lm"] = str(lm)
        train.update(SYNTHETIC_HF_TRAIN.get(strategy, {}))
    return {"vlm": vlm,
            "data": {"synthetic": 100000, "synthetic_eval": 300, "blank_images": blank,
                     "max_batch_tokens": 1024},
            "train": train}


def save_tiny_llama(path, seed: int = 0):
    """A random-weight HF Llama the size of the built-in tiny decoder (hidden 64, 2 layers,
    4 heads, 2 KV heads, the byte tokenizer's 260 tokens), saved with `save_pretrained`
    and no tokenizer files: the synthetic run with `--lm` on a pretrained-LM code path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True, bos_token_id=257, eos_token_id=258, pad_token_id=256)
        LlamaForCausalLM(cfg).save_pretrained(path)
    return path
