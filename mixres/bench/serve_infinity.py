"""What `mixres bench serve` compares against: Infinity (`infinity-emb`) on the same CLIP.

Infinity pins numpy<2 and brings its own torch and transformers, so it lives in its own venv
(`python -m venv V && V/bin/pip install "infinity-emb[server,torch,vision]" aiohttp`) and runs
as a subprocess on 127.0.0.1. It loads a directory: a random-init CLIP saved with
`save_pretrained` beside a `CLIPProcessor` whose tokenizer is a byte-level vocabulary written
here (nothing downloaded). Its image processor resizes the short side to 224 and center-crops
224 x 224: 196 tokens at patch 16, which is what mixres is given per image for equal work.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx

__all__ = ["write_clip_dir", "Infinity"]


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each of the 256 bytes (their BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _byte_vocab(folder: Path) -> None:
    """A CLIP BPE tokenizer with no merges: every byte (and byte + '</w>') is a token."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def write_clip_dir(folder: str | Path, *, hidden: int = 384, layers: int = 6, seed: int = 0) -> Path:
    """A random-init CLIPModel (vision tower `layers` x `hidden`, patch 16, 224 px) + its processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  intermediate_size=4 * hidden, image_size=224, patch_size=16)
    text = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256,
                vocab_size=515, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                pad_token_id=513)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=hidden)).eval()
    model.save_pretrained(folder)
    _byte_vocab(folder)
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def start_until_ready(cmd: list[str], log: str | Path, probe: str, name: str,
                      poll_s: float = 0.5, limit_s: float = 600) -> tuple[subprocess.Popen, object]:
    """Start a server process (output to `log`) and wait until `probe` answers 200.
    Returns (process, the open log file); raises one line naming `name` and the log."""
    log_file = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + limit_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}; see {log}")
        try:
            if httpx.get(probe, timeout=2).status_code == 200:
                return proc, log_file
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready in {limit_s:.0f} s; see {log}")
        time.sleep(poll_s)


class Infinity:
    """`infinity_emb v2` on 127.0.0.1:port, from the venv at `venv`, stopped on exit."""

    def __init__(self, venv: str | Path, model_dir: str | Path, port: int, log: Path):
        self.exe = Path(venv) / "bin" / "infinity_emb"
        self.model_dir, self.port, self.log = str(model_dir), port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def available(self) -> bool:
        return self.exe.exists()

    def __enter__(self) -> Infinity:
        cmd = [str(self.exe), "v2", "--model-id", self.model_dir, "--engine", "torch", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port), "--no-bettertransformer"]
        self.proc, self._log = start_until_ready(cmd, self.log, f"{self.url}/health", "infinity_emb")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # the hang the issue describes: SIGTERM not honoured
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    path = "/embeddings"

    def body(self, uris: list[str]) -> dict:
        return {"model": self.model_dir, "input": uris, "modality": "image"}
