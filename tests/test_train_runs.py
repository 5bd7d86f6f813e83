"""Runs a user can trust and reuse: --out is never overwritten by accident, checkpoints are
pruned by age, --resume is the same run (its config read back, changes refused), a run
loads for inference (load_run, `mixres generate`, build_vlm(config.json)); LLaVA records;
one-line errors for bad values; the examples run as written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import TINY_VLM, _config, _losses, _write_manifest

from mixres.vlm import build_vlm
from mixres.vlm.training.checkpoint import latest_checkpoint, load_weights
from mixres.vlm.training.manifest import ManifestDataset, ManifestError, read_manifest
from mixres.vlm.training.train import train

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mixres", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_fresh_run_into_an_existing_out_is_refused_and_resume_still_works(tmp_path):
    manifest = _write_manifest(tmp_path)
    out = tmp_path / "R"
    train(_config(manifest, steps=6, save_every=2, keep_checkpoints=2), out)
    with pytest.raises(ValueError, match=r"--out .*R already holds .*--resume.*--overwrite"):
        train(_config(manifest, steps=2), out)
    assert latest_checkpoint(out).name == "step_000006"          # nothing was touched
    assert max(s for s, _ in _losses(out)) == 6
    train(_config(manifest, steps=2, save_every=1), out, overwrite=True)
    assert latest_checkpoint(out).name == "step_000002"
    assert [s for s, _ in _losses(out)] == [1, 2]


def test_checkpoints_are_pruned_by_age_never_the_latest(tmp_path):
    from mixres.vlm.training.checkpoint import save_checkpoint
    from mixres.vlm.training.optim import build_optimizer, warmup_cosine

    vlm = build_vlm(TINY_VLM)
    opt = build_optimizer(vlm, 1e-3)
    sched = warmup_cosine(opt, 10)
    for step in (30, 45, 15):  # an older run's higher steps, then this run's step 15
        save_checkpoint(tmp_path, step, vlm, opt, sched, {"epoch": 0, "step": step}, {}, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_000015"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000015", "step_000045"]


def test_resume_reads_the_run_config_and_refuses_changes(tmp_path):
    manifest = _write_manifest(tmp_path)
    toml = tmp_path / "run.toml"
    toml.write_text(f'[vlm]\nencoder = {{name = "random", hidden = 32, patch_size = 8}}\nadapter = "mlp2"\n'
                    f'min_image_tokens = 4\nmax_image_tokens = 16\nmax_seq_tokens = 256\n'
                    f'[data]\nmanifest = "{manifest.name}"\nmax_batch_tokens = 96\n'
                    f'[train]\nsteps = 4\nlr = 3e-3\nprogress = false\nplot = false\nthreads = 1\n')
    out = tmp_path / "run"
    r = _cli("train", str(toml), "--out", str(out), "--steps", "2")
    assert r.returncode == 0, r.stderr
    r = _cli("train", "--resume", "--out", str(out), "--steps", "3")  # no CONFIG: OUT/config.json
    assert r.returncode == 0, r.stderr
    assert "train.steps 2 -> 3: the warm-up + cosine schedule now spans 3 steps" in r.stderr
    assert latest_checkpoint(out).name == "step_000003"
    r = _cli("train", "--resume", "--out", str(out), "--strategy", "mot", "--steps", "4")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "was trained with vlm.strategy = 'joint_decoder', this run sets 'mot'" in err[0]
    cfg = json.loads((out / "config.json").read_text())
    cfg["train"]["lr"] = 1.0
    with pytest.raises(ValueError, match=r"train.lr = 0.003, this run sets 1.0"):
        train(cfg, out, resume=True)


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path):
    manifest = _write_manifest(tmp_path)
    out = tmp_path / "done"
    train(_config(manifest, steps=2), out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = _cli("train", "--resume", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "already at step 2 of 2\n"
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_run_loads_for_inference(tmp_path):
    from mixres.vlm import load_run

    manifest = _write_manifest(tmp_path)
    out = tmp_path / "run"
    train(_config(manifest, steps=3), out)
    vlm = load_run(out)
    w = load_weights(latest_checkpoint(out) / "model.safetensors")
    assert all(torch.equal(vlm.state_dict()[k], w[k]) for k in w)
    fresh = build_vlm(out / "config.json")
    assert set(fresh.state_dict()) == set(w)
    image = tmp_path / "img0.png"
    expect = vlm.generate([image], "<image>:", max_new_tokens=5)
    r = _cli("generate", str(out), "--image", str(image), "--prompt", "<image>:", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == expect
    r = _cli("generate", str(out), "--image", str(tmp_path), "--prompt", "x")
    assert r.returncode == 2 and "is a directory" in r.stderr


def test_config_values_are_type_checked_in_one_line(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[train]\nsteps = "20"\n')
    r = _cli("train", str(toml), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip() == "mixres train: error: [train] steps must be an integer, got '20' (a string)"
    with pytest.raises(ValueError, match="VLM config max_seq_tokens must be an integer, got 1.5"):
        build_vlm({"max_seq_tokens": 1.5})


def test_image_errors_say_what_is_wrong(tmp_path):
    (tmp_path / "adir").mkdir()
    path = tmp_path / "m.jsonl"
    path.write_text('{"images": ["adir"], "prompt": "<image>", "response": "x"}\n')
    with pytest.raises(ManifestError, match="image 'adir' is a directory, not an image file"):
        read_manifest(path)
    vlm = build_vlm({**TINY_VLM, "adapter": "merge2x2"})
    (tmp_path / "bad.png").write_text("not pixels")
    with pytest.raises(ValueError) as err:
        vlm.collate([{"images": [tmp_path / "bad.png"], "text": "<image> x"}])
    assert "merge2x2" not in str(err.value)  # the grid hint is only for grid errors
    with pytest.raises(ValueError, match="the merge2x2 adapter needs grids in multiples of 2"):
        vlm.collate([{"images": [torch.zeros(3, 24, 16)], "text": "<image> x"}])


def test_llava_records_with_one_or_several_images(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (24, 16)).save(tmp_path / name)
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                 {"from": "gpt", "value": "a box"}]},
            {"images": ["a.png", "b.png"], "conversations": [
                {"from": "human", "value": "compare"}, {"from": "gpt", "value": "same"},
                {"from": "human", "value": "sure?"}, {"from": "gpt", "value": "yes"}]}]
    path = tmp_path / "llava.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ManifestDataset.from_file(path)
    assert ds.image_sizes(1) == [(16, 24), (16, 24)]
    vlm = build_vlm(TINY_VLM)
    batch = vlm.collate([{k: v for k, v in ds[i].items() if k != "source"} for i in range(2)])
    assert batch.images_per_sample == [1, 2]
    lab = batch.labels
    trained = vlm.tokenizer.decode(lab[lab != -100].tolist())
    assert trained == "a boxsame\nyes"  # assistant turns (and <eos>s) only
    from mixres.vlm.training.data import sample_length

    for i in range(2):  # planned lengths equal collated ones
        assert sample_length(vlm, ds[i], ds.image_sizes(i)) == vlm.collator.num_positions(ds[i])
    path.write_text('{"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"},'
                    ' {"from": "gpt", "value": "x"}]}\n')
    with pytest.raises(ManifestError, match="1 image.s. but 2 <image> placeholder"):
        read_manifest(path)


def test_examples_run_as_written(tmp_path):
    ex = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", ex, ignore=shutil.ignore_patterns("images", "tiny-llama", "*.jsonl"))
    r = subprocess.run([sys.executable, str(ex / "make_example.py"), "--samples", "24"], capture_output=True,
                       text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    for toml in ("train_tiny.toml", "train_tiny_chat.toml"):
        out = tmp_path / toml
        r = _cli("train", str(ex / toml), "--out", str(out), "--steps", "2", "--no-progress", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "summary.json").read_text())["steps"] == 2
    r = _cli("generate", str(tmp_path / "train_tiny.toml"), "--image", str(ex / "images" / "0000.png"),
             "--prompt", "<image>:", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    # the real pairing's config parses and names every key it sets correctly
    from mixres.vlm.training.config import RunConfig

    cfg = RunConfig.from_any(ex / "siglip2_qwen2.5.toml")
    assert cfg.vlm["lm"] == "Qwen/Qwen2.5-0.5B" and [s.get("train") for s in cfg.train.stages] == [
        ["adapter"], ["adapter", "lm"]]
