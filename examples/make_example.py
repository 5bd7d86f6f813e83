"""Make the example's files next to this script (or under --out): a small manifest of shape
images of mixed sizes in both manifest forms, and a tiny random HF Llama to train on them.

    python examples/make_example.py
    python -m mixres train examples/train_tiny.toml --out runs/tiny

Writes images/*.png, train.jsonl (prompt/response records), chat.jsonl (LLaVA-style
conversation records, two images in some), eval.jsonl and tiny-llama/ (config.json +
model.safetensors from `save_pretrained`; no tokenizer files, so mixres uses its byte
tokenizer and says so). The Llama has the synthetic task's size: hidden 64, 2 layers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixres.vlm.training.synthetic import SyntheticShapes, render, save_tiny_llama

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE), help="folder to write into (default: this one)")
    p.add_argument("--samples", type=int, default=400)
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    shapes = SyntheticShapes(args.samples + 40, seed=7)
    records, chats, evals = [], [], []
    for i in range(len(shapes)):
        spec = shapes.spec(i)
        name = f"images/{i:04d}.png"
        render(spec).save(out / name)
        rec = {"images": [name], "prompt": "<image>:", "response": spec.caption}
        if i >= args.samples:
            evals.append(rec)
        else:
            records.append(rec)
            if i % 2:  # the same picture as a LLaVA conversation, with the previous one too
                prev = f"images/{i - 1:04d}.png"
                chats.append({"images": [prev, name], "conversations": [
                    {"from": "human", "value": "<image> and <image>\nWhat is in the second picture?"},
                    {"from": "gpt", "value": spec.caption}]})
    for fname, rows in (("train.jsonl", records), ("chat.jsonl", chats), ("eval.jsonl", evals)):
        (out / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny_llama(out / "tiny-llama")
    print(f"wrote {len(records)} + {len(evals)} samples, {len(chats)} conversations and tiny-llama/ to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
