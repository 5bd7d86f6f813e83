"""Inference from a training run: `mixres.vlm.load_run("run/")` and `mixres generate RUN`.

    vlm = mixres.vlm.load_run("runs/tiny")           # OUT/config.json + the latest weights
    vlm.generate(["cat.png"], "<image>:", max_new_tokens=16)

    python -m mixres generate runs/tiny --image cat.png --prompt "<image>:"

`build_vlm("runs/tiny/config.json")` builds the same VLM with its initial weights.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["load_run", "add_arguments", "run"]


def load_run(run, device=None, checkpoint: str | None = None):
    """The VLM of a `mixres train` output folder, with the weights of its latest checkpoint
    (or of `checkpoint`, a folder name under RUN/checkpoints), in eval mode."""
    from mixres.vlm.build import build_vlm
    from mixres.vlm.training.checkpoint import latest_checkpoint, load_weights

    run = Path(run)
    config = run / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"run {run}: no config.json; expected the --out folder of mixres train")
    ckpt = run / "checkpoints" / checkpoint if checkpoint else latest_checkpoint(run)
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"run {run}: no complete checkpoint under {run / 'checkpoints'}")
    vlm = build_vlm(config)
    vlm.load_state_dict(load_weights(ckpt / "model.safetensors"))
    if device is not None:
        vlm = vlm.to(device)
    return vlm.eval()


def add_arguments(parser) -> None:
    parser.add_argument("run", help="a mixres train --out folder")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for more)")
    parser.add_argument("--prompt", default="", help="the prompt; each <image> marks one image "
                                                    "(none: the images go first)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--checkpoint", help="a folder under RUN/checkpoints (default: the latest)")
    parser.add_argument("--device", help="cpu | cuda (default: cpu)")


def run(args) -> int:
    for p in args.image:
        if Path(p).is_dir():
            raise ValueError(f"--image {p} is a directory, not an image file")
        if not Path(p).is_file():
            raise FileNotFoundError(f"--image {p} not found")
    vlm = load_run(args.run, device=args.device, checkpoint=args.checkpoint)
    print(vlm.generate(list(args.image), args.prompt, max_new_tokens=args.max_new_tokens))
    return 0
