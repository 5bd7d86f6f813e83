"""Training: exact resume, 2 processes (DDP, FSDP2) == 1 process, freeze stages, manifest
errors that name the line, and a short synthetic run that learns to see.

All on CPU with a tiny VLM (random-projection encoder, 2-layer hidden-64 decoder).
"""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import torch
from PIL import Image

from mixres.vlm import build_vlm
from mixres.vlm.training.checkpoint import latest_checkpoint, load_weights
from mixres.vlm.training.manifest import ManifestError, read_manifest
from mixres.vlm.training.optim import param_groups
from mixres.vlm.training.sampler import TokenBudgetSampler
from mixres.vlm.training.synthetic import CHANCE
from mixres.vlm.training.train import train

TINY_VLM = {"encoder": {"name": "random", "hidden": 32, "patch_size": 8}, "adapter": "mlp2",
            "lm": "tiny", "min_image_tokens": 4, "max_image_tokens": 16, "max_seq_tokens": 256}


def _write_manifest(root, n=12):
    """n samples with images of mixed sizes; some prompt/response, some text, one text-only."""
    lines = []
    for i in range(n):
        w, h = 16 + 8 * (i % 5), 16 + 8 * ((i * 3) % 4)
        name = f"img{i}.png"
        Image.new("RGB", (w, h), (20 * i % 255, 90, 200 - 10 * i)).save(root / name)
        if i % 3 == 0:
            lines.append({"images": [name], "prompt": "<image>:", "response": f"sample {i}"})
        elif i % 3 == 1:
            lines.append({"images": [name], "text": f"<image> picture number {i}"})
        else:
            lines.append({"images": [name, f"img{i - 1}.png"], "prompt": "<image><image>two:",
                          "response": f"pair {i}"})
    lines.append({"text": "no image at all"})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _config(manifest, steps=6, **train):
    return {"vlm": dict(TINY_VLM),
            "data": {"manifest": str(manifest), "eval_manifest": str(manifest), "max_batch_tokens": 96},
            "train": {"steps": steps, "lr": 3e-3, "warmup": 2, "log_every": 1, "seed": 3,
                      "progress": False, "threads": 1, "plot": False, **train}}


def _losses(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


# resume

def test_resume_continues_exactly(tmp_path):
    manifest = _write_manifest(tmp_path)
    full = train(_config(manifest), tmp_path / "full")
    cut = tmp_path / "cut"
    train(_config(manifest), cut, stop_after=3)
    assert latest_checkpoint(cut).name == "step_000003"
    resumed = train(_config(manifest, plot=True), cut, resume=True)
    assert _losses(cut) == _losses(tmp_path / "full")  # step for step, bit for bit
    assert resumed["eval_loss"] == full["eval_loss"]
    a = load_weights(latest_checkpoint(tmp_path / "full") / "model.safetensors")
    b = load_weights(latest_checkpoint(cut) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (cut / "loss.png").stat().st_size > 0
    # the state file loads with weights_only=True (nothing but tensors and plain data)
    torch.load(latest_checkpoint(cut) / "train_state.pt", weights_only=True)


def test_activation_checkpointing_of_the_named_blocks_changes_no_loss(tmp_path):
    manifest = _write_manifest(tmp_path)
    vit = {"name": "vit", "hidden": 32, "layers": 2, "heads": 4, "patch_size": 8}
    cfg = _config(manifest, steps=3)
    cfg["vlm"]["encoder"] = vit
    assert len(build_vlm(cfg["vlm"]).blocks()) == 3  # the ViT tower, the LM's 2 blocks
    train(cfg, tmp_path / "plain")
    train(_config(manifest, steps=3, activation_checkpointing=True) | {"vlm": cfg["vlm"]}, tmp_path / "ckpt")
    plain, ckpt = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert [s for s, _ in ckpt] == [s for s, _ in plain] == [1, 2, 3]
    assert [x for _, x in ckpt] == pytest.approx([x for _, x in plain], rel=1e-6)


# freeze stages

def test_freeze_stages_adapter_then_lm(tmp_path):
    manifest = _write_manifest(tmp_path)
    stages = [{"until": 2, "train": ["adapter"]}, {"train": ["adapter", "lm"]}]
    out = tmp_path / "run"
    train(_config(manifest, steps=4, stages=stages, save_every=2), out)
    init = build_vlm(TINY_VLM).state_dict()
    at2 = load_weights(out / "checkpoints" / "step_000002" / "model.safetensors")
    at4 = load_weights(out / "checkpoints" / "step_000004" / "model.safetensors")

    def moved(sd, prefix):
        return any(not torch.equal(sd[k], init[k]) for k in init if k.startswith(prefix))

    assert moved(at2, "adapter.") and not moved(at2, "lm.") and not moved(at2, "encoder.")
    assert moved(at4, "adapter.") and moved(at4, "lm.") and not moved(at4, "encoder.")


def test_no_weight_decay_on_norms_biases_embeddings():
    vlm = build_vlm(TINY_VLM)
    decay, no_decay = param_groups(vlm, 0.1)
    assert "lm.embed_tokens.weight" in no_decay["names"]
    assert any(n.endswith("norm.weight") for n in no_decay["names"])
    assert any(n.endswith(".bias") for n in no_decay["names"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "adapter.net.0.weight" in decay["names"]


# sampler

def test_sampler_bins_full_shuffled_and_sharded():
    lengths = [int(x) for x in torch.randint(5, 60, (400,))]
    one = TokenBudgetSampler(lengths, 128, seed=1, accum=2)
    two = [TokenBudgetSampler(lengths, 128, seed=1, world_size=2, rank=r) for r in range(2)]
    assert one.fill(0) > 0.9
    assert one.epoch_bins(0) != one.epoch_bins(1)  # reshuffled every epoch
    for step in range(5):  # the global batch is the union of the ranks' bins
        assert one.step_bins(0, step) == [two[0].step_bins(0, step)[0], two[1].step_bins(0, step)[0]]
    bins = one.epoch_bins(0)
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len({i for b in bins for i in b}) == sum(len(b) for b in bins)


# manifest errors

@pytest.mark.parametrize("line, expect", [
    ('{"images": ["nope.png"], "text": "<image> x"}', "image 'nope.png' not found"),
    ('{"images": ["a.png"], "text": "<image> x"', "bad JSON"),
    ('{"images": ["a.png"], "prompt": "describe", "response": "x"}', "1 image(s) but 0 <image>"),
    ('{"images": ["a.png", "a.png"], "text": "<image> x"}', "2 image(s) but 1 <image>"),
    ('{"images": ["a.png"], "caption": "x"}', "expected either 'text' or 'prompt'"),
])
def test_manifest_errors_name_the_line(tmp_path, line, expect):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    good = '{"images": ["a.png"], "text": "<image> fine"}'
    path = tmp_path / "m.jsonl"
    path.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ManifestError, match=re.escape(expect)) as err:
        read_manifest(path, placeholders="require")
    assert f"{path}:3:" in str(err.value)


def test_manifest_paths_relative_and_placeholders_prepended(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "sub" / "b.png")
    path = tmp_path / "m.jsonl"
    path.write_text('{"images": ["sub/b.png"], "prompt": "what?", "response": "b"}\n')
    (rec,) = read_manifest(path)
    assert rec.images == [tmp_path / "sub" / "b.png"] and rec.sizes == [(20, 30)]
    assert rec.prompt == "<image>what?"


# 2 processes == 1 process

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, manifest, outs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for how, out in outs.items():
            if how == "fsdp_bf16":
                train(_config(manifest, steps=3, parallel="fsdp", precision="bf16"), out)
            else:
                train(_config(manifest, steps=4, parallel=how), out)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_and_fsdp_on_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    manifest = _write_manifest(tmp_path, n=16)
    ref = train(_config(manifest, steps=4, accum=2), tmp_path / "one")  # same global batch
    outs = {"ddp": str(tmp_path / "ddp"), "fsdp": str(tmp_path / "fsdp"),
            "fsdp_bf16": str(tmp_path / "fsdp_bf16")}
    # fork: the children reuse the imported modules (spawn re-imports torch: seconds each)
    mp.start_processes(_worker, args=(2, _free_port(), str(manifest), outs), nprocs=2, join=True,
                       start_method="fork")
    # FSDP2 with bf16 on: parameters gathered in bf16 (its mixed-precision policy), gradients
    # reduced in fp32; the same steps as one process under bf16 autocast, to bf16's precision
    train(_config(manifest, steps=3, accum=2, precision="bf16"), tmp_path / "one_bf16")
    got, want = _losses(tmp_path / "fsdp_bf16"), _losses(tmp_path / "one_bf16")
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3]
    assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-3)
    del outs["fsdp_bf16"]
    want = _losses(tmp_path / "one")
    w_ref = load_weights(latest_checkpoint(tmp_path / "one") / "model.safetensors")
    for how in outs:
        got = _losses(tmp_path / how)
        assert [s for s, _ in got] == [s for s, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, rel=1e-5), how
        summary = json.loads((tmp_path / how / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["parallel"] == how
        assert summary["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-4)
        w = load_weights(latest_checkpoint(tmp_path / how) / "model.safetensors")
        assert set(w) == set(w_ref)
        for k in w_ref:
            assert torch.allclose(w[k], w_ref[k], rtol=1e-4, atol=1e-5), (how, k)


# the synthetic task learns to see

def test_synthetic_run_beats_blank_images(tmp_path):
    """A short run of the synthetic task (its ViT encoder trained from scratch) reads the colour
    and more off the image; the same run on blank images cannot do better than chance."""
    from mixres.vlm.training.synthetic import synthetic_config

    results = {}
    for blank in (False, True):
        cfg = synthetic_config("joint_decoder", blank=blank, steps=STEPS)
        cfg["data"].update(synthetic=4000, synthetic_eval=60, max_batch_tokens=512)
        cfg["train"].update(warmup=20, eval_every=0, log_every=50, plot=False, progress=False, threads=1)
        results[blank] = train(cfg, tmp_path / str(blank))
    seeing, blind = results[False], results[True]
    assert blind["content_accuracy"] < CHANCE + 0.15, results
    assert seeing["content_accuracy"] > blind["content_accuracy"] + 0.2, results
    assert seeing["accuracy_by_word"][0] > 0.8, results  # the colour


STEPS = 250
