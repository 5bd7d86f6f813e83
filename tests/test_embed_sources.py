"""Sources of `mixres embed` (webdataset tars, parquet, datasets folders) and its outputs:
each source gives the features of the same images as loose files, survives kill -9, records
bad members, and the folder (pooled/, metadata/, lock, `mixres verify`) holds what it says."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import rel_err

from mixres.embed import embed, encode, read_features
from mixres.embed.verify import verify
from mixres.workloads import write_photos

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
SMALL = ((24, 90), (24, 90))
KW = dict(backend="packed", max_image_tokens=16, shard_size=2, progress=False)
CLI = ["--model", "tiny-vit", "--max-image-tokens", "16", "--shard-size", "2", "--num-workers", "0",
       "--no-progress"]
N = 7  # photos: 4 output shards of 2, the last one short


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return write_photos(tmp_path_factory.mktemp("photos"), n=N, seed=5, sizes=SMALL)


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> Path:
    """The photos as loose files, in this order."""
    out = tmp_path_factory.mktemp("ref")
    embed([str(p) for p in photos], out, "tiny-vit", **KW)
    return out


def write_tars(folder: Path, photos: list[Path], per_shard: int = 4, extra=None) -> list[Path]:
    """webdataset shards: sample i = <key>.<ext> image + .json + .txt, in photo order."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = [(f"sample{i:03d}", {p.suffix[1:]: p.read_bytes(), "json": json.dumps({"i": i}).encode(),
                                   "txt": f"photo {i}".encode()}) for i, p in enumerate(photos)]
    samples += extra or []
    shards = []
    for s in range(0, len(samples), per_shard):
        path = folder / f"{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for key, members in samples[s:s + per_shard]:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def image_struct(values) -> pa.Array:
    return pa.array(values, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def write_parquets(folder: Path, photos: list[Path], structs: bool, files: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out, per = [], -(-len(photos) // files)
    for f in range(files):
        part = photos[f * per:(f + 1) * per]
        data = [p.read_bytes() for p in part]
        col = image_struct([{"bytes": d, "path": p.name} for d, p in zip(data, part)]) if structs \
            else pa.array(data, type=pa.binary())
        table = pa.table({"uid": [p.stem for p in part], "image": col,
                          "caption": [f"photo {p.stem}" for p in part]})
        path = folder / f"part-{f}.parquet"
        pq.write_table(table, path, row_group_size=2)  # several row groups per file
        out.append(path)
    return out


def assert_same_as_files(out, reference, key_to_path: dict[str, str]):
    """Every record of `out` equals the record of the same image embedded as a file."""
    a, b = read_features(out), read_features(reference)
    assert list(a) == list(key_to_path) and len(b) == len(a)
    for key, path in key_to_path.items():
        x, y = a[key], b[path]
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.pooled, y.pooled), key
        assert x.sha256 == y.sha256 and x.grid_hw == y.grid_hw


# each source kind == the same images as files

def test_tar_shards_by_brace_pattern_and_file_url_equal_files(photos, reference, tmp_path):
    shards = write_tars(tmp_path / "shards", photos)
    keys = {f"{shards[i // 4].name}/sample{i:03d}": str(p) for i, p in enumerate(photos)}
    pattern = str(tmp_path / "shards" / "{000000..000001}.tar")
    embed(pattern, tmp_path / "brace", "tiny-vit", **KW)
    assert_same_as_files(tmp_path / "brace", reference, keys)
    feats = read_features(tmp_path / "brace")
    assert feats.meta["source"]["units"] == [[str(shards[0]), 4], [str(shards[1]), 3]]
    assert feats["000001.tar/sample005"].source == str(shards[1])
    url = "file://" + pattern
    embed(url, tmp_path / "url", "tiny-vit", **KW)
    assert_same_as_files(tmp_path / "url", reference, keys)
    # the .json / .txt members are the metadata of each row
    meta = pq.read_table(tmp_path / "url" / "metadata").to_pylist()
    assert [m["mixres_key"] for m in meta] == list(keys)
    # the sample's own fields are columns: __key__, the .json member's keys, the .txt as caption
    assert (meta[5]["__key__"], meta[5]["i"], meta[5]["caption"]) == ("sample005", 5, "photo 5")
    assert meta[5]["mixres_source"] == "file://" + str(shards[1])
    # encode() reads the same source in memory (other batches: equal up to fp32 rounding)
    mem = encode(pattern, "tiny-vit", max_image_tokens=16)
    files = torch.stack([read_features(reference)[p].pooled for p in keys.values()])
    assert rel_err(mem.pooled, files) <= 1e-5


@pytest.mark.parametrize("structs", [False, True], ids=["bytes", "image-structs"])
def test_parquet_with_bytes_or_image_structs_equals_files(photos, reference, tmp_path, structs):
    files = write_parquets(tmp_path / "pq", photos, structs)
    embed(tmp_path / "pq", tmp_path / "out", "tiny-vit", **KW)  # a folder; image column found by itself
    per = -(-N // 2)
    keys = {f"{files[i // per].name}#{i % per}": str(p) for i, p in enumerate(photos)}
    assert_same_as_files(tmp_path / "out", reference, keys)
    # --id-column names the rows; a glob works as a folder does
    embed(str(tmp_path / "pq" / "part-*.parquet"), tmp_path / "ids", "tiny-vit", id_column="uid", **KW)
    assert_same_as_files(tmp_path / "ids", reference, {p.stem: str(p) for p in photos})
    meta = pq.read_table(tmp_path / "ids" / "metadata").to_pylist()
    assert [(m["mixres_key"], m["uid"], m["caption"]) for m in meta] == [(p.stem, p.stem, f"photo {p.stem}")
                                                                     for p in photos]


def test_parquet_image_column_must_be_unambiguous(photos, tmp_path):
    data = [p.read_bytes() for p in photos[:2]]
    pq.write_table(pa.table({"a": data, "b": data}), tmp_path / "two.parquet")
    with pytest.raises(ValueError, match=r"several columns could hold images \(a, b\).*--image-column"):
        embed(tmp_path / "two.parquet", tmp_path / "out", "tiny-vit", **KW)
    embed(tmp_path / "two.parquet", tmp_path / "out", "tiny-vit", image_column="b", **KW)
    assert list(read_features(tmp_path / "out")) == ["two.parquet#0", "two.parquet#1"]


def test_datasets_save_to_disk_folder_equals_files(photos, reference, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": p.read_bytes(), "path": None} for p in photos],
         "name": [p.name for p in photos]},
        features=datasets.Features({"image": datasets.Image(), "name": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    embed(tmp_path / "ds", tmp_path / "out", "tiny-vit", **KW)
    assert_same_as_files(tmp_path / "out", reference, {f"ds#{i}": str(p) for i, p in enumerate(photos)})
    embed(tmp_path / "ds", tmp_path / "named", "tiny-vit", id_column="name", **KW)
    assert list(read_features(tmp_path / "named")) == [p.name for p in photos]


# bad members

def test_bad_members_land_in_errors_jsonl_and_the_run_goes_on(photos, tmp_path):
    jpg = next(p for p in photos if p.suffix == ".jpg").read_bytes()
    extra = [("corrupt", {"jpg": os.urandom(500)}), ("noimage", {"json": b"{}", "txt": b"caption only"}),
             ("truncated", {"jpg": jpg[: len(jpg) // 2]}), ("noimage", {"png": photos[1].read_bytes()})]
    write_tars(tmp_path / "shards", photos[:3], per_shard=4, extra=extra)
    # a torn shard: cut in the middle of its second image
    torn = write_tars(tmp_path / "torn", photos[3:5], per_shard=2)[0]
    with tarfile.open(torn) as tf:
        m = tf.getmember(f"sample001{photos[4].suffix}")
    (tmp_path / "shards" / "000002.tar").write_bytes(torn.read_bytes()[:m.offset_data + m.size // 2])
    s = embed(tmp_path / "shards", tmp_path / "out", "tiny-vit", **KW)  # a folder of .tar files
    assert s["images"] == 4 and s["errors"] == 5
    errors = [json.loads(x) for x in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    got = [(e["key"], Path(e["source"]).name, e["reason"]) for e in errors]
    assert all(k.split("/")[0] == shard for k, shard, _ in got)  # each names its shard
    assert [g[0] for g in got] == ["000000.tar/corrupt", "000001.tar/noimage", "000001.tar/truncated",
                                   "000001.tar/noimage", "000002.tar/sample001"]
    assert "no image member (has: json, txt)" in got[1][2]
    assert "truncated" in got[2][2]
    assert "duplicate key" in got[3][2]  # a second group with one key: keys stay unique
    assert "truncated tar member" in got[4][2]
    assert list(read_features(tmp_path / "out")) == [f"000000.tar/sample{i:03d}" for i in range(3)] + [
        "000002.tar/sample000"]
    # parquet: a null image and bytes that are no image
    pq.write_table(pa.table({"image": image_struct([{"bytes": photos[0].read_bytes(), "path": "a"},
                                                    {"bytes": None, "path": None},
                                                    {"bytes": b"hello", "path": "c"}])}),
                   tmp_path / "bad.parquet")
    s = embed(tmp_path / "bad.parquet", tmp_path / "pqout", "tiny-vit", **KW)
    errors = [json.loads(x) for x in (tmp_path / "pqout" / "errors.jsonl").read_text().splitlines()]
    assert s["images"] == 1 and [e["key"] for e in errors] == ["bad.parquet#1", "bad.parquet#2"]
    assert "null" in errors[0]["reason"] and errors[1]["source"] == str(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: bad.parquet#1: no image .*on-error fail"):
        embed(tmp_path / "bad.parquet", tmp_path / "failout", "tiny-vit", on_error="fail", **KW)


# crashes and resume

def run_child(inp, out, kill=None, wait=True, extra=()):
    """`mixres embed` in a child process; kill=(stage, n) kills it after its nth shard reaches stage."""
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    how = ["-m", "mixres", "embed"] if kill is None else [str(ROOT / "tests" / "embed_child.py"), kill[0],
                                                          str(kill[1])]
    cmd = [sys.executable, *how, str(inp), "--out", str(out), *CLI, *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("kind", ["tar", "parquet"])
def test_kill_9_at_any_moment_then_resume_is_exact(photos, tmp_path, kind):
    if kind == "tar":
        write_tars(tmp_path / "src", photos, per_shard=3)
        inp = str(tmp_path / "src" / "{000000..000002}.tar")
    else:
        write_parquets(tmp_path / "src", photos, structs=True, files=3)
        inp = tmp_path / "src"
    ref = tmp_path / "ref"
    embed(inp, ref, "tiny-vit", **KW)
    out = tmp_path / "out"
    r = run_child(inp, out, kill=("written", 2))  # shard 1 durable, not journaled
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_child(inp, out, kill=("journaled", 1))
    assert r.returncode == -signal.SIGKILL, r.stderr
    p = run_child(inp, out, wait=False)
    time.sleep(random.Random().uniform(0.5, 8.0))
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = run_child(inp, out)
    assert r.returncode == 0, r.stderr
    index = lambda d: (d / "index.jsonl").read_text()  # noqa: E731
    assert index(out) == index(ref)
    for sub in ("shard-*", "pooled/*", "metadata/*"):
        assert sorted(f.name for f in out.glob(sub)) == sorted(f.name for f in ref.glob(sub))
    assert not list(out.rglob(".*tmp*")) and verify(out) == []
    a, b = read_features(out), read_features(ref)
    for k in b:
        assert torch.equal(a[k].tokens, b[k].tokens) and torch.equal(a[k].pooled, b[k].pooled)
    # a changed source is refused, naming what changed
    if kind == "tar":
        write_tars(tmp_path / "src", photos[:-1], per_shard=3)
        with pytest.raises(ValueError, match=r"another listing of this source \(.*000002.tar: 1 -> absent"):
            embed(inp.replace("000002", "000001"), out, "tiny-vit", **KW)


# one writer per folder

def test_a_second_run_on_the_same_folder_is_refused_at_once(photos, reference, tmp_path):
    out = tmp_path / "out"
    inp = tmp_path / "list.txt"
    inp.write_text("\n".join(map(str, photos)))
    first = run_child(inp, out, wait=False)
    deadline = time.time() + 120
    while f'"pid": {first.pid}' not in ((out / ".lock").read_text() if (out / ".lock").exists() else ""):
        assert time.time() < deadline and first.poll() is None, "the first run never took the lock"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGSTOP)  # holds the lock, frozen mid-run
    try:
        second = run_child(inp, out)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "another mixres embed run" in lines[0]
    assert "host " in lines[0] and "started " in lines[0]
    assert first.wait(timeout=180) == 0, first.stderr.read()
    assert verify(out) == []
    assert (out / "index.jsonl").read_text() == (reference / "index.jsonl").read_text()
    # the lock is released at the end: the next run goes
    assert run_child(inp, out).returncode == 0


# the folder on disk

def test_pooled_and_metadata_agree_row_for_row_with_read_features(photos, reference, tmp_path):
    import faiss

    feats = read_features(reference)
    keys, vectors = feats.pooled()
    assert keys == list(feats) and vectors.shape == (N, feats[0].pooled.shape[0])
    meta = pq.read_table(reference / "metadata").to_pylist()
    assert [m["mixres_key"] for m in meta] == keys
    for i, (key, m) in enumerate(zip(keys, meta)):
        rec = feats[key]
        assert np.array_equal(vectors[i], rec.pooled.numpy())
        assert (m["mixres_grid_h"], m["mixres_grid_w"], m["mixres_tokens"], m["mixres_sha256"]) == (
            *rec.grid_hw, rec.tokens.shape[0], rec.sha256)
    parts = sorted(reference.glob("pooled/*.npy"))
    assert [f.name for f in parts] == [f"{s:06d}.npy" for s in range(4)]
    assert np.array_equal(np.concatenate([np.load(f) for f in parts]), np.asarray(vectors))
    # the README's faiss snippet: cosine search over pooled/
    x = np.asarray(vectors, dtype="float32")
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, ids = index.search(x[[3]], 3)
    assert ids[0][0] == 3 and keys[ids[0][0]] == str(photos[3]) and scores[0][0] == pytest.approx(1, abs=1e-5)
    assert scores[0][0] >= scores[0][1] >= scores[0][2]


def test_no_tokens_writes_only_pooled_and_metadata(photos, reference, tmp_path):
    out = tmp_path / "out"
    embed([str(p) for p in photos], out, "tiny-vit", write_tokens=False, **KW)
    assert not list(out.glob("shard-*")) and len(list(out.glob("pooled/*.npy"))) == 4
    assert verify(out) == []
    a, b = read_features(out), read_features(reference)
    (ka, va), (kb, vb) = a.pooled(), b.pooled()
    assert ka == kb and np.array_equal(np.asarray(va), np.asarray(vb))
    one = str(photos[2])
    assert a[one].tokens is None and torch.equal(a[one].pooled, b[one].pooled)
    with pytest.raises(ValueError, match="other settings.*write_tokens: True -> False"):
        embed([str(p) for p in photos], reference, "tiny-vit", write_tokens=False, **KW)
    with pytest.raises(ValueError, match="--no-tokens.*--pool"):
        embed([str(p) for p in photos], tmp_path / "x", "tiny-vit", write_tokens=False, pool="none", **KW)


def test_read_features_is_a_read_only_mapping(photos, reference):
    from collections.abc import Mapping

    feats = read_features(reference)
    assert isinstance(feats, Mapping) and len(feats) == N
    assert list(feats) == list(feats.keys()) == [str(p) for p in photos]
    assert str(photos[0]) in feats and "nope" not in feats
    assert [r.key for r in feats.records()] == list(feats)
    assert [r.key for r in feats.values()] == list(feats)
    k, rec = next(iter(feats.items()))
    assert rec.key == rec.path == k and torch.equal(feats[0].tokens, rec.tokens)
    with pytest.raises(TypeError):
        feats["x"] = rec


def test_verify_passes_good_folders_and_names_each_problem(reference, tmp_path):
    from mixres.cli import main

    assert verify(reference) == []
    assert main(["verify", str(reference)]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    (bad / "shard-000001.safetensors").unlink()                      # a deleted shard
    data = (bad / "shard-000002.safetensors").read_bytes()
    (bad / "shard-000002.safetensors").write_bytes(data[: len(data) // 2])  # a truncated shard
    (bad / "pooled" / "000003.npy").write_bytes(b"\x93NUMPY")         # a torn pooled file
    lines = (bad / "index.jsonl").read_text().splitlines()
    (bad / "index.jsonl").write_text("\n".join(lines + lines[:1]) + "\n")  # a doubled row
    problems = verify(bad)
    text = "\n".join(problems)
    assert any(p.startswith("shard-000001.safetensors: missing") for p in problems), text
    assert any(p.startswith("shard-000002.safetensors: unreadable or incomplete") for p in problems), text
    assert any(p.startswith("pooled/000003.npy: unreadable") for p in problems), text
    assert any(f"index.jsonl line {N + 1}: key" in p and "also at line 1" in p for p in problems), text
    assert any("index.jsonl has 8 rows, the journals 7" in p for p in problems), text
    r = subprocess.run([sys.executable, "-m", "mixres", "verify", str(bad)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": PYTHONPATH}, timeout=120)
    assert r.returncode == 1
    assert r.stdout.strip().splitlines() == [f"mixres verify: {bad}: {p}" for p in problems]


def test_one_image_file_as_input_is_a_list_of_one(photos, reference, tmp_path):
    from mixres.embed.sources import open_source

    src = open_source(photos[2])
    assert src.kind == "files" and src.keys == [str(photos[2])]
    embed(photos[2], tmp_path / "out", "tiny-vit", **KW)
    one, ref = read_features(tmp_path / "out"), read_features(reference)
    assert list(one) == [str(photos[2])]
    # alone in its shard: equal to the file in a 2-image shard up to fp32 rounding
    assert rel_err(one[str(photos[2])].tokens, ref[str(photos[2])].tokens) <= 1e-5
