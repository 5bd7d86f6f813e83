"""`mixres embed` and `mixres.encode`: what lands on disk equals encoding each image in memory,
whatever the input form, bad inputs, crashes, resumes or number of ranks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from mixres.embed import embed, encode, read_features
from mixres.workloads import write_photos

ROOT = Path(__file__).resolve().parents[1]
# children import this checkout (and whatever the parent had on PYTHONPATH, e.g. a transformers overlay)
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
SMALL = ((24, 90), (24, 90))  # photo widths, heights: at most 5x5 patches of 16
KW = dict(backend="packed", max_image_tokens=16, shard_size=2, progress=False)
CLI = ["--model", "tiny-vit", "--max-image-tokens", "16", "--shard-size", "2", "--num-workers", "0",
       "--no-progress"]


@pytest.fixture(scope="module")
def model():
    return "tiny-vit"


def encode_alone(path, **kw):
    return encode([path], "tiny-vit", max_image_tokens=16, **kw)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder / "a", n=5, seed=1, sizes=SMALL)
    write_photos(folder / "b", n=4, seed=2, sizes=SMALL)
    return folder


@pytest.fixture(scope="module")
def reference(model, photos, tmp_path_factory):
    """One uninterrupted in-process run over the photos folder."""
    out = tmp_path_factory.mktemp("ref")
    embed(photos, out, model, **KW)
    return out


def index_of(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "index.jsonl").read_text().splitlines()]


def assert_same_features(out, ref, exact=True):
    a, b = read_features(out), read_features(ref)
    assert a.paths == b.paths
    for x, y in zip(a.records(), b.records()):
        if exact:
            assert torch.equal(x.tokens, y.tokens) and torch.equal(x.pooled, y.pooled), x.path
        else:
            assert rel_err(x.tokens, y.tokens) <= 1e-5 and rel_err(x.pooled, y.pooled) <= 1e-5, x.path


def mixres_cmd(inp, out, *, launcher=(sys.executable,), kill=None):
    """The command line of a child run; kill=(stage, n) kills it after its nth shard reaches stage."""
    how = ["-m", "mixres", "embed"] if kill is None else [str(ROOT / "tests" / "embed_child.py"), kill[0],
                                                          str(kill[1])]
    return [*launcher, *how, str(inp), "--out", str(out), *CLI]


def run_child(inp, out, kill=None, wait=True):
    """`mixres embed` in a child process (so that it can be SIGKILLed)."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    if not wait:
        return subprocess.Popen(mixres_cmd(inp, out), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(mixres_cmd(inp, out, kill=kill), env=env, capture_output=True, text=True,
                          timeout=120)


# inputs

def test_folder_list_and_jsonl_give_the_same_index(model, photos, reference, tmp_path):
    paths = [r["path"] for r in index_of(reference)]
    assert len(paths) == 9 and paths == sorted(paths)  # recursive, in path order
    listing = tmp_path / "list.txt"
    # relative entries are relative to the list file; comments and duplicates are dropped
    rel = [os.path.relpath(p, tmp_path) for p in paths]
    listing.write_text("# photos\n" + "\n".join(rel + rel[:1]) + "\n\n")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "label": i}) + "\n" for i, p in enumerate(paths)))
    for src in (listing, jsonl):
        out = tmp_path / src.suffix[1:]
        embed(src, out, model, **KW)
        assert index_of(out) == index_of(reference)
        assert_same_features(out, reference)


def test_cli_demo_writes_photos_and_embeds_them(tmp_path, capsys):
    from mixres.cli import main

    out = tmp_path / "demo"
    assert main(["embed", "--demo", "--model", "tiny-vit", "--out", str(out), "--limit", "6",
                 "--num-workers", "1", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "6 images" in said and "images/s" in said
    feats = read_features(out)
    assert len(feats) == 6 and all(Path(p).parent == out / "demo_images" for p in feats.paths)
    assert feats.meta["model"] == "tiny-vit" and feats.meta["status"]["complete"]


# bad inputs

def _bad_inputs(folder: Path, good: list[Path]) -> dict[str, str]:
    """Every kind of bad input -> a word its reason must contain."""
    jpg = good[0].read_bytes()
    (folder / "corrupt.jpg").write_bytes(os.urandom(2000))
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("hello, I am not a picture\n")
    from PIL import Image
    Image.new("RGB", (200, 200), (9, 9, 9)).save(folder / "huge.png")
    (folder / "adir.jpg").mkdir()
    return {"corrupt.jpg": "", "truncated.jpg": "truncated", "empty.png": "empty", "text.png": "not an image",
            "huge.png": "too large", "missing.jpg": "no such file", "adir.jpg": "directory"}


def test_bad_inputs_are_skipped_with_a_reason(model, tmp_path):
    good = write_photos(tmp_path / "img", n=3, seed=3, sizes=SMALL)
    bad = _bad_inputs(tmp_path / "img", good)
    order = [str(good[0]), *(str(tmp_path / "img" / b) for b in bad), *map(str, good[1:])]
    (tmp_path / "list.txt").write_text("\n".join(order))
    summary = embed(tmp_path / "list.txt", tmp_path / "out", model, max_pixels=20000, **KW)
    assert summary["images"] == 3 and summary["errors"] == len(bad)
    errors = {Path(e["path"]).name: e["reason"] for e in
              map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == set(bad)
    for name, word in bad.items():
        assert word in errors[name], (name, errors[name])
    feats = read_features(tmp_path / "out")
    assert feats.paths == [str(p) for p in good]
    assert rel_err(feats[good[1]].tokens, encode_alone(good[1]).tokens) <= 1e-5


def test_on_error_fail_stops_with_one_line_and_keeps_what_was_written(model, tmp_path):
    good = write_photos(tmp_path / "img", n=6, seed=4, sizes=SMALL)
    (tmp_path / "img" / "photo_003_bad.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ValueError, match="photo_003_bad.jpg.*on-error fail") as e:
        embed(tmp_path / "img", tmp_path / "out", model, on_error="fail", **KW)
    assert "\n" not in str(e.value)
    # inputs 0-3 (two shards) were durable before the bad one (input 4, shard 2)
    assert [r["path"] for r in index_of(tmp_path / "out")] == [str(p) for p in good[:4]]
    embed(tmp_path / "img", tmp_path / "out", model, on_error="skip", **KW)
    embed(tmp_path / "img", tmp_path / "fresh", model, on_error="skip", **KW)
    assert index_of(tmp_path / "out") == index_of(tmp_path / "fresh")
    assert_same_features(tmp_path / "out", tmp_path / "fresh")


# what is on disk

def test_read_features_round_trip_equals_encode_each_image(model, photos, reference):
    from safetensors.numpy import load_file

    feats = read_features(reference)
    rows = index_of(reference)
    assert feats.paths == [r["path"] for r in rows] and len(feats) == 9
    for rec, row in zip(feats.records(), rows):
        alone = encode_alone(rec.path)  # the image alone == the image in a packed shard
        assert rel_err(rec.tokens, alone.tokens) <= 1e-5 and rel_err(rec.pooled, alone.pooled[0]) <= 1e-5
        assert list(rec.grid_hw) == row["grid"] == alone.grid_hw[0].tolist()
        assert rec.tokens.shape[0] == row["tokens"] == 1 + row["grid"][0] * row["grid"][1]
        assert torch.equal(feats[row["path"]].tokens, rec.tokens)  # lookup by path
        # the shard is plain safetensors: numpy alone reads the same numbers
        shard = load_file(Path(reference) / row["shard"])
        cu = shard["cu_seqlens"]
        got = shard["tokens"][cu[row["row"]]:cu[row["row"] + 1]]
        assert got.dtype.name == "float32" and (got == rec.tokens.numpy()).all()
    packed = feats.to_packed()
    assert packed.num_images == 9 and torch.equal(packed.unpack()[3], feats[3].tokens)


def test_pool_options(model, photos, tmp_path):
    imgs = sorted(photos.rglob("*.png"))[:3]
    base = encode(imgs, model, max_image_tokens=16, pool="none")
    assert base.pooled is None
    cls = encode(imgs, model, max_image_tokens=16, pool="cls").pooled
    mean = encode(imgs, model, max_image_tokens=16, pool="mean").pooled
    for i, t in enumerate(base.unpack()):
        assert torch.equal(cls[i], t[0])
        assert rel_err(mean[i], t[1:].mean(0)) <= 1e-6  # patch tokens only
    embed(photos, tmp_path / "out", model, pool="mean", **KW)
    feats = read_features(tmp_path / "out")
    assert rel_err(feats[0].pooled, feats[0].tokens[1:].mean(0)) <= 1e-6


def test_penultimate_layer_stored_as_float16(model, photos, tmp_path):
    embed(photos, tmp_path / "out", model, select_layer=-2, pool="mean", store_dtype="float16", **KW)
    feats = read_features(tmp_path / "out")
    assert feats.meta["store_dtype"] == "float16" and feats.meta["preprocessing"]["max_image_tokens"] == 16
    rec = feats[4]
    alone = encode_alone(rec.path, select_layer=-2, pool="mean")
    assert rec.tokens.dtype == torch.float16
    assert rel_err(rec.tokens.float(), alone.tokens) <= 1e-3  # fp16 rounding
    assert rel_err(rec.pooled.float(), alone.pooled[0]) <= 1e-3


def test_changed_settings_are_refused(model, photos, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with pytest.raises(ValueError, match=r"other settings \(pool: 'model' -> 'cls'"):
        embed(photos, out, model, **{**KW, "pool": "cls"})
    with pytest.raises(ValueError, match="model: 'tiny-vit' -> 'tiny-clip'"):
        embed(photos, out, "tiny-clip", **KW)
    assert index_of(out) == index_of(reference)


def test_out_of_memory_halves_the_batch_and_goes_on(model, photos, reference, tmp_path, monkeypatch):
    from mixres.encoders import make_encoder

    enc = make_encoder(model, backend="packed", max_image_tokens=16)
    real, calls = enc.forward, []

    def flaky(packed):
        calls.append(packed.num_images)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(packed)

    monkeypatch.setattr(enc, "forward", flaky)
    s = embed(photos, tmp_path / "out", enc, model_name="tiny-vit", **{**KW, "max_batch_tokens": 10_000})
    assert s["images"] == 9 and calls[0] == 2 and calls[1] == 1  # the 2-image batch was halved
    assert index_of(tmp_path / "out") == index_of(reference)
    # smaller batches after the OOM: the same features up to fp32 rounding
    assert_same_features(tmp_path / "out", reference, exact=False)


# crashes, resume, ranks

def test_kill_9_at_any_moment_then_resume_equals_an_uninterrupted_run(photos, reference, tmp_path):
    out = tmp_path / "out"
    # killed right after its 2nd shard is durable, before that shard's journal line: an orphan
    r = run_child(photos, out, kill=("written", 2))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert len(list(out.glob("shard-*.safetensors"))) == 2
    # resumes (drops the orphan, redoes shard 1), killed right after its first journal line
    r = run_child(photos, out, kill=("journaled", 1))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    # killed at a random moment (during start-up, a shard write, a journal append, ...)
    p = run_child(photos, out, wait=False)
    time.sleep(random.Random().uniform(0.5, 10.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_child(photos, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert index_of(out) == index_of(reference)  # every input exactly once, same rows and shards
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(p.name for p in reference.glob("shard-*"))
    assert not list(out.glob(".*tmp*"))
    assert_same_features(out, reference)


def test_a_resume_may_change_the_batch_budget_and_the_workers(photos, reference, tmp_path):
    # after an out-of-memory a user resumes with a smaller --max-batch-tokens, on another machine
    # with other --num-workers: batching never changes a feature, so the folder is the same
    out = tmp_path / "out"
    r = run_child(photos, out, kill=("journaled", 1))  # --max-batch-tokens 8192, 0 workers
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    fingerprint = json.loads((out / "meta.json").read_text())["fingerprint"]
    s = embed(photos, out, "tiny-vit", **{**KW, "max_batch_tokens": 20, "num_workers": 1})
    assert s["done_before"] == 1 and s["images"] == 7
    assert json.loads((out / "meta.json").read_text())["fingerprint"] == fingerprint
    assert index_of(out) == index_of(reference)
    assert_same_features(out, reference, exact=False)  # one image per forward: fp32 rounding only


def test_the_summary_rate_is_over_the_runs_wall_time(photos, tmp_path):
    s = embed(photos, tmp_path / "out", "tiny-vit", **KW)
    assert s["images_per_s"] == pytest.approx(s["images"] / s["seconds"])
    assert 0 < s["encoder_seconds"] <= s["stream_seconds"] <= s["seconds"]
    assert s["encoder_images_per_s"] == pytest.approx(s["images"] / s["encoder_seconds"])


def test_torchrun_two_processes_equal_one(photos, reference, tmp_path):
    out = tmp_path / "out"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = mixres_cmd(photos, out, launcher=(torchrun, "--nproc_per_node", "2", "--master_port",
                                            str(29500 + os.getpid() % 1000)))
    r = subprocess.run([*cmd, "--device", "cpu"], env={**os.environ, "PYTHONPATH": PYTHONPATH},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.glob("progress-r*.jsonl")) == ["progress-r0.jsonl", "progress-r1.jsonl"]
    assert index_of(out) == index_of(reference)
    # torchrun runs each rank on one thread; fp32 sums may round differently from two threads
    assert_same_features(out, reference, exact=False)
