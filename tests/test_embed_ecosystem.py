"""The embed folder as the field's own tools read it: img2dataset's output as INPUT, the source's
fields as metadata columns with one schema per folder (pandas, pyarrow.dataset, HF datasets),
normalized float16 vectors in clip-retrieval's layout; and the faults a user still hit: a scan
that dropped odd paths without a word, a full disk."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixres.embed import embed, read_features
from mixres.embed.verify import verify
from mixres.workloads import write_photos

SMALL = ((24, 90), (24, 90))
KW = dict(backend="packed", max_image_tokens=16, shard_size=2, progress=False, num_workers=0)
N = 7


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return write_photos(tmp_path_factory.mktemp("photos"), n=N, seed=5, sizes=SMALL)


def write_img2dataset(folder: Path, photos: list[Path], per_shard: int = 4) -> list[Path]:
    """What `img2dataset --output_format webdataset` writes: NNNNN.tar of .jpg/.json/.txt samples,
    with NNNNN.parquet (one row per URL, failed downloads too) and NNNNN_stats.json beside it."""
    folder.mkdir(parents=True)
    sidecars = []
    for s in range(0, len(photos), per_shard):
        shard = f"{s // per_shard:05d}"
        rows = []
        with tarfile.open(folder / f"{shard}.tar", "w") as tf:
            for i, p in enumerate(photos[s:s + per_shard]):
                key = f"{shard}{i:04d}"
                meta = {"url": f"https://example.com/{p.name}", "caption": f"a photo, {p.stem}", "key": key,
                        "status": "success", "error_message": None, "width": 32, "height": 24,
                        "exif": json.dumps({"Make": "mixres"}), "sha256": None}
                rows.append(meta)
                for ext, data in (("jpg", p.read_bytes()), ("json", json.dumps(meta).encode()),
                                  ("txt", meta["caption"].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        rows.append({**rows[0], "key": f"{shard}9999", "status": "failed_to_download",
                     "error_message": "HTTP 404", "width": None, "height": None})
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard}.parquet")
        stats = {"count": len(rows), "successes": len(rows) - 1}
        (folder / f"{shard}_stats.json").write_text(json.dumps(stats))
        sidecars.append(folder / f"{shard}.parquet")
    return sidecars


def test_an_img2dataset_folder_is_input_as_given_and_its_keys_join(photos, tmp_path):
    sidecars = write_img2dataset(tmp_path / "i2d", photos)
    s = embed(tmp_path / "i2d", tmp_path / "out", "tiny-vit", **KW)
    assert s["images"] == N and s["errors"] == 0
    meta = pq.read_table(tmp_path / "out" / "metadata").to_pandas()
    source = pa.concat_tables([pq.read_table(p) for p in sidecars]).to_pandas()
    joined = meta.merge(source, on="key", suffixes=("", "_i2d"))
    assert len(joined) == N == len(meta)  # every row finds its img2dataset row
    assert (joined["url"] == joined["url_i2d"]).all() and (joined["caption"] == joined["caption_i2d"]).all()
    assert list(meta["__key__"]) == list(meta["key"]) and meta["url"].str.startswith("https://").all()
    # the source's own types: the sidecar's int64 widths stay numbers, its all-null column is text
    schema = pq.read_schema(tmp_path / "out" / "metadata" / "000000.parquet")
    assert schema.field("width").type == pa.int64() and schema.field("error_message").type == pa.string()
    assert verify(tmp_path / "out") == []
    # a folder that really mixes kinds is still refused in one line
    pq.write_table(pa.table({"image": [photos[0].read_bytes()]}), tmp_path / "i2d" / "other.parquet")
    with pytest.raises(ValueError, match=r"^INPUT .*mixes \.tar and \.parquet"):
        embed(tmp_path / "i2d", tmp_path / "out2", "tiny-vit", **KW)


def test_one_metadata_schema_per_folder_whatever_a_shard_holds(photos, tmp_path):
    # a column null in the first output shard and filled in the next; an int32 column
    data = [p.read_bytes() for p in photos]
    note = [None, None] + [f"note {i}" for i in range(2, N)]
    table = pa.table({"image": pa.array(data, pa.binary()), "note": pa.array(note, pa.string()),
                      "n": pa.array(range(N), pa.int32()), "key": [f"k{i}" for i in range(N)],
                      "sha256": ["x"] * N})
    pq.write_table(table, tmp_path / "src.parquet")
    out = tmp_path / "out"
    embed(tmp_path / "src.parquet", out, "tiny-vit", **KW)
    folder = out / "metadata"
    schemas = {pq.read_schema(f).remove_metadata() for f in sorted(folder.glob("*.parquet"))}
    assert len(schemas) == 1
    schema = schemas.pop()
    assert schema.field("note").type == pa.string() and schema.field("n").type == pa.int32()
    # parquet columns keep their names (mixres' own are mixres_*)
    assert {"key", "sha256", "mixres_key", "mixres_sha256"} <= set(schema.names)
    meta = json.loads((out / "meta.json").read_text())
    assert [f[0] for f in meta["metadata_schema"]["fields"]] == schema.names
    import datasets
    import pandas as pd
    import pyarrow.dataset as pads

    by_pandas = pd.read_parquet(folder)
    by_arrow = pads.dataset(folder, format="parquet").to_table()
    by_hf = datasets.load_dataset("parquet", data_files=sorted(map(str, folder.glob("*.parquet"))),
                                  split="train", cache_dir=str(tmp_path / "hf"))
    for rows in (by_pandas["note"].tolist(), by_arrow.column("note").to_pylist(), by_hf["note"]):
        assert [None if x is None or x != x else x for x in rows] == note
    assert by_arrow.column("key").to_pylist() == [f"k{i}" for i in range(N)]


def test_normalize_float16_in_the_clip_retrieval_layout(photos, tmp_path):
    out = tmp_path / "feats"
    write_img2dataset(tmp_path / "i2d", photos)
    embed(tmp_path / "i2d", out, "tiny-vit", normalize=True, pooled_dtype="float16",
          layout="clip-retrieval", **KW)
    emb = sorted((out / "img_emb").glob("*.npy"))
    meta = sorted((out / "metadata").glob("*.parquet"))
    # clip-retrieval's names: img_emb/img_emb_{i}.npy beside metadata/metadata_{i}.parquet, zero-padded
    # so that name order is row order; nothing else in either folder
    assert [p.name for p in emb] == [f"img_emb_{i:06d}.npy" for i in range(4)]
    assert [p.name for p in meta] == [f"metadata_{i:06d}.parquet" for i in range(4)]
    assert not (out / "pooled").exists()
    keys = [json.loads(x)["key"] for x in (out / "index.jsonl").read_text().splitlines()]
    rows = []
    for e, m in zip(emb, meta):
        a, t = np.load(e), pq.read_table(m)
        assert a.dtype == np.float16 and a.ndim == 2 and a.shape[0] == t.num_rows  # row aligned
        assert np.allclose(np.linalg.norm(a.astype(np.float32), axis=1), 1, atol=1e-3)
        rows += t.column("mixres_key").to_pylist()
    assert rows == keys
    # the vectors are the model's pooled vectors, L2-normalized
    plain = tmp_path / "plain"
    embed(tmp_path / "i2d", plain, "tiny-vit", **KW)
    ref = np.concatenate([np.load(p) for p in sorted((plain / "pooled").glob("*.npy"))])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = np.concatenate([np.load(p) for p in emb]).astype(np.float32)
    assert np.abs(got - ref).max() <= 1e-3
    # an item is its own nearest neighbour under inner product (autofaiss' default)
    assert (np.argmax(got @ got.T, axis=1) == np.arange(N)).all()
    assert verify(out) == [] and read_features(out).pooled()[0] == keys
    with pytest.raises(ValueError, match="--normalize acts on pooled vectors"):
        embed(tmp_path / "i2d", tmp_path / "x", "tiny-vit", normalize=True, pool="none", **KW)


def test_a_folder_scan_reports_every_path_it_cannot_read(photos, tmp_path):
    folder = tmp_path / "img"
    good = write_photos(folder, n=3, seed=6, sizes=SMALL)
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "adir.jpg").mkdir()
    (folder / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (folder / "notes.txt").write_text("not an image name: not listed")
    s = embed(folder, tmp_path / "out", "tiny-vit", **KW)
    assert s["images"] == 3 and s["errors"] == 4
    errors = {Path(e["path"]).name: e["reason"] for e in
              map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())}
    assert errors == {"adir.jpg": "is a directory, not an image file",
                      "dangling.jpg": f"dangling symbolic link (to {folder / 'gone.jpg'})",
                      "drawing.svg": errors["drawing.svg"], "loop.png": "symbolic link loop"}
    assert errors["drawing.svg"].startswith("unsupported image type .svg (supported: ")
    assert read_features(tmp_path / "out").paths == [str(p) for p in good]


# a full disk

def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder on a filesystem that fills up after a few shards, and a way to free space: a real
    64 KiB tmpfs where this platform lets us mount one, else the writer made to raise ENOSPC."""
    disk = tmp_path / "disk"
    if _mount_tmpfs(disk, "64k"):
        free = lambda: subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # noqa: E731
        yield disk, free
        subprocess.run(["umount", "-l", str(disk)], check=True)
        return
    from mixres.embed import store

    real, state = store.write_atomic, {"writes": 0, "full": True}

    def write_atomic(path, data):
        state["writes"] += 1
        if state["full"] and state["writes"] > 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(store, "write_atomic", write_atomic)
    yield disk, lambda: state.update(full=False)


def test_a_full_disk_is_one_line_and_the_rerun_resumes_exactly(photos, tmp_path, small_disk, capsys):
    from mixres.cli import main

    disk, free = small_disk
    inp = tmp_path / "list.txt"
    inp.write_text("\n".join(map(str, photos)))
    out = disk / "feats"
    cli = ["embed", str(inp), "--out", str(out), "--model", "tiny-vit", "--max-image-tokens", "16",
           "--shard-size", "2", "--num-workers", "0", "--no-progress"]
    assert main(cli) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"cannot write to {out}" in err[0] and "errno 28, ENOSPC" in err[0] and "rerun" in err[0]
    # the journal is consistent: every line it holds points at complete files; no half files
    from mixres.embed.state import record_files
    from mixres.embed.store import read_journals

    records = [r for recs, _ in read_journals(out).values() for r in recs]
    assert all((out / f).stat().st_size for r in records for f in record_files(r))
    assert not list(out.rglob(".*tmp*"))
    free()
    assert main(cli) == 0
    ref = tmp_path / "ref"
    embed(inp, ref, "tiny-vit", **KW)
    assert (out / "index.jsonl").read_text() == (ref / "index.jsonl").read_text()
    assert verify(out) == [] and not list(out.rglob(".*tmp*"))
    a, b = read_features(out), read_features(ref)
    for k in b:
        assert np.array_equal(a[k].tokens.numpy(), b[k].tokens.numpy())
