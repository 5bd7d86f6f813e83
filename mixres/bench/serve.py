"""mixres bench serve: `mixres serve` under closed-loop load vs batching off, padded batching, Infinity.

Two sections, each run within one invocation so its numbers are ratios measured together:

  equal work   a random-init CLIP (vision tower --layers x --hidden, patch 16) saved with
               save_pretrained. Infinity resizes the short side to 224 and center-crops:
               196 tokens per image, so mixres is given exactly 196 tokens per image too
               (--min/--max-image-tokens 196, aspect kept). Rows: mixres packed (continuous
               batching), mixres batching off (one request at a time), Infinity (from its own
               venv, where installed), and the encoder alone (`mixres.encode` on the same
               JPEG bytes in this process, decode included; timed before and after the
               servers, the mean reported).
  mixed sizes  a ViT twin of that tower, each image at its own size (64-1024 tokens):
               packed vs padded batching (backend masked: each batch padded to its largest
               image, attention masked) vs batching off.

The load: N closed-loop clients on 127.0.0.1, each sending requests of K images of the
mixed-JPEG workload (200-1000 px, aspect 0.5-2), bounded by --requests and --time-limit.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from mixres.bench.report import command_line, env_info, write_json
from mixres.bench.serve_infinity import Infinity, start_until_ready, write_clip_dir
from mixres.bench.serve_load import closed_loop, summarize

__all__ = ["add_arguments", "run"]

HOST = "127.0.0.1"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MixresServer:
    """`mixres serve` in a subprocess on 127.0.0.1, up until exit."""

    def __init__(self, model: str, flags: list[str], log: Path):
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = [sys.executable, "-m", "mixres", "serve", "--model", model, "--host", HOST,
                    "--port", str(self.port), "--log-level", "warning", *flags]
        self.log = log

    def __enter__(self) -> MixresServer:
        self.proc, self._log = start_until_ready(self.cmd, self.log, f"{self.url}/ready", "mixres serve",
                                                 poll_s=0.3)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self._log.close()

    path = "/v1/embeddings"

    @staticmethod
    def body(uris: list[str]) -> dict:
        return {"input": uris}


def _uris(paths) -> list[str]:
    return ["data:image/jpeg;base64," + base64.b64encode(Path(p).read_bytes()).decode() for p in paths]


def _groups(uris: list[str], k: int) -> list[list[str]]:
    return [[uris[(i * k + j) % len(uris)] for j in range(k)] for i in range(len(uris))]


def compare(servers: dict, uris: list[str], settings: list[tuple[int, int]], args) -> dict:
    """Each setting on every server, in --rounds rounds whose order alternates (forward, then
    backward), so a machine whose speed drifts over minutes weighs on all servers alike."""
    rows: dict = {name: [] for name in servers}
    for clients, k in settings:
        groups = _groups(uris, k)
        n = max(clients * 2, args.images // k)
        parts: dict = {name: [] for name in servers}
        for rnd in range(args.rounds):
            for name in (list(servers) if rnd % 2 == 0 else list(servers)[::-1]):
                s = servers[name]
                parts[name].append(closed_loop(s.url, groups, s.body, clients=clients, requests=n,
                                               time_limit_s=args.time_limit, path=s.path))
        for name in servers:
            r = dict(summarize(parts[name]), images_per_request=k)
            print(f"    {name}: {clients} clients x {k} images: {r['images_per_s']:.1f} images/s, "
                  f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, errors {r['errors']}", flush=True)
            rows[name].append(r)
    return rows


def time_encoder(model_dir: str, blobs: list[bytes], min_tokens: int, max_tokens: int) -> float:
    """images/s of `mixres.encode` on the JPEG bytes in this process (decode + forward), 32 at a time."""
    import mixres

    enc = mixres.load_encoder(model_dir, min_image_tokens=min_tokens, max_image_tokens=max_tokens)
    mixres.encode(blobs[:4], model=enc)
    t = time.perf_counter()
    for i in range(0, len(blobs), 32):
        mixres.encode(blobs[i:i + 32], model=enc)
    return len(blobs) / (time.perf_counter() - t)


def _settings(args) -> list[tuple[int, int]]:
    return [(int(c), int(k)) for c, k in (s.split("x") for s in args.settings.split(","))]


def _write_vit_twin(clip_dir: Path, out: Path) -> str:
    """An HF ViTModel with the CLIP tower's shape (random init), for the masked (padded) backend."""
    import torch
    from transformers import CLIPConfig, ViTConfig, ViTModel

    v = CLIPConfig.from_pretrained(clip_dir).vision_config
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=v.hidden_size, num_hidden_layers=v.num_hidden_layers,
                    num_attention_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                    image_size=224, patch_size=16)
    ViTModel(cfg).eval().save_pretrained(out)
    return str(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="benchmarks/results/serve-cpu")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--images", type=int, default=64, help="images of the mixed-JPEG workload per load")
    p.add_argument("--settings", default="1x1,8x1,8x4", help="CLIENTSxIMAGES per request, comma-separated")
    p.add_argument("--mixed-settings", default="8x4", help="the same for the mixed-sizes section")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per load and round at most")
    p.add_argument("--rounds", type=int, default=2, help="rounds per setting, the servers' order alternating")
    p.add_argument("--decode-workers", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--infinity-venv", default=os.environ.get("MIXRES_INFINITY_VENV", "/work/venvs/infinity"),
                   help="a venv with infinity-emb[server,torch,vision] (its row is skipped where absent)")
    p.add_argument("--skip-mixed", action="store_true", help="only the equal-work section")


def run(args) -> int:
    from mixres.workloads import write_mixed_jpegs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings, mixed_settings = _settings(args), _settings(argparse.Namespace(settings=args.mixed_settings))
    res = {"command": command_line(), "env": env_info(), "sections": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = write_clip_dir(tmp / "clip", hidden=args.hidden, layers=args.layers)
        paths = write_mixed_jpegs(tmp / "jpegs", n=args.images)
        blobs = [p.read_bytes() for p in paths]
        uris = _uris(paths)
        common = ["--decode-workers", str(args.decode_workers),
                  "--max-batch-tokens", str(args.max_batch_tokens), "--max-wait-ms", str(args.max_wait_ms),
                  "--max-request-images", "256"]
        equal = ["--min-image-tokens", "196", "--max-image-tokens", "196", *common]
        sec: dict = {}
        print("equal work (196 tokens per image): encoder alone ...", flush=True)
        enc_before = time_encoder(str(clip), blobs, 196, 196)
        with contextlib.ExitStack() as stack:
            servers = {name: stack.enter_context(MixresServer(str(clip), flags, tmp / f"{name}.log"))
                       for name, flags in (("mixres packed", equal),
                                           ("mixres batching off", [*equal, "--batching", "off"]))}
            inf = Infinity(args.infinity_venv, clip, _free_port(), tmp / "infinity.log")
            if inf.available():
                servers["infinity"] = stack.enter_context(inf)
            else:
                sec["skipped"] = f"infinity: no {inf.exe}"
            sec["rows"] = compare(servers, uris, settings, args)
        enc_after = time_encoder(str(clip), blobs, 196, 196)
        sec["encoder_alone"] = {"before": enc_before, "after": enc_after,
                                "mean": (enc_before + enc_after) / 2}
        res["sections"]["equal_work"] = sec
        if not args.skip_mixed:
            vit = _write_vit_twin(clip, tmp / "vit")
            mixed = ["--min-image-tokens", "64", "--max-image-tokens", "1024", *common]
            print("mixed sizes (64-1024 tokens per image)", flush=True)
            with contextlib.ExitStack() as stack:
                servers = {name: stack.enter_context(MixresServer(vit, flags, tmp / f"mixed {name}.log"))
                           for name, flags in (("mixres packed", mixed),
                                               ("mixres padded", [*mixed, "--backend", "masked"]),
                                               ("mixres batching off", [*mixed, "--batching", "off"]))}
                res["sections"]["mixed_sizes"] = {"rows": compare(servers, uris, mixed_settings, args)}
    from mixres.bench.serve_report import plot, write_markdown

    write_json(res, out / "results.json")
    write_markdown(res, out / "results.md")
    plot(res, out / "serve.png")
    print(f"wrote {out}/results.md, results.json, serve.png")
    return 0
