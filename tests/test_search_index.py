"""The search index in-process: kinds against brute force, the cache in the folder and what
`mixres verify` says of it, items and thumbnails read back from files and parquet, refusals."""

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mixres.embed import embed
from mixres.embed.verify import verify
from mixres.encoders import make_encoder, resolve_pool
from mixres.search.folder import folder_prep, model_identity, open_folder
from mixres.search.index import SearchIndex
from mixres.search.kinds import choose_kind
from mixres.workloads import write_photos

MODEL = "tiny-clip"


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(1, n // 50), dim))
    return (centers[rng.integers(0, len(centers), n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_each_kind_finds_what_brute_force_finds(kind):
    x = clustered(4000, 32)
    index = SearchIndex.build(x, kind)
    assert index.kind.name == kind and len(index) == 4000
    queries = x[::80]
    scores, ids = index.search(queries * 3.0, 10)  # queries are normalized too
    want = brute_force(x, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want)])
    assert recall == 1.0 if kind == "flat" else recall >= 0.9, recall
    assert (ids[:, 0] == np.arange(0, 4000, 80)).all()  # each vector is its own nearest
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_auto_is_exact_up_to_exact_max_then_approximate():
    assert choose_kind("auto", 100, exact_max=100).name == "flat"
    assert choose_kind("auto", 101, exact_max=100).name == "ivf"
    assert SearchIndex.build(clustered(3000, 16), exact_max=1000).kind.name == "ivf"
    with pytest.raises(ValueError, match="unknown search index kind 'ivfx'"):
        choose_kind("ivfx", 10)


@pytest.fixture(scope="module")
def files_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("search-files")
    write_photos(root / "photos", n=6, seed=5)
    embed(str(root / "photos"), str(root / "feats"), MODEL, num_workers=0, progress=False)
    return root / "feats"


@pytest.fixture(scope="module")
def identity():
    enc = make_encoder(MODEL)
    return model_identity(enc, resolve_pool(None, enc))


def test_the_index_is_cached_in_the_folder_and_verify_checks_it(files_folder, tmp_path, identity):
    folder = tmp_path / "feats"
    shutil.copytree(files_folder, folder)
    first = open_folder(folder, expect=identity)
    assert not first.from_cache and verify(folder) == []
    again = open_folder(folder, expect=identity)
    assert again.from_cache
    ids = again.index.search(again.index.vector(2)[None], 3)[1]
    assert (ids == first.index.search(first.index.vector(2)[None], 3)[1]).all() and ids[0, 0] == 2

    (cached,) = folder.glob("search/index-*.faiss")
    cached.write_bytes(cached.read_bytes()[:-7])  # torn
    problems = verify(folder)
    assert len(problems) == 1 and problems[0].startswith(f"search/{cached.name}: ")
    assert "incomplete" in problems[0]
    rebuilt = open_folder(folder, expect=identity)  # a broken cache is rebuilt, not refused
    assert not rebuilt.from_cache and verify(folder) == []

    other = open_folder(folder, kind="hnsw")  # another kind, another fingerprint
    assert other.index.kind.name == "hnsw" and not other.from_cache
    assert len(list(folder.glob("search/*.faiss"))) == 1
    (folder / "search" / "stray.faiss").write_bytes(b"x")
    assert verify(folder) == ["search/stray.faiss: on disk but index.json does not name it"]

    # what a save killed before its rename leaves: a temporary file, ignored, then removed
    (folder / "search" / "stray.faiss").unlink()
    (folder / "search" / ".index-0123.faiss.tmp999").write_bytes(b"torn")
    assert verify(folder) == []
    assert open_folder(folder, kind="flat").index.kind.name == "flat"
    assert sorted(p.name for p in (folder / "search").iterdir()) == \
        sorted(["index.json", next(folder.glob("search/index-*.faiss")).name])


def test_vectors_are_normalized_at_load_when_the_folder_was_not(files_folder, identity):
    from mixres.embed.reader import read_features

    folder = open_folder(files_folder, expect=identity)
    _, pooled = read_features(files_folder).pooled()
    norms = np.linalg.norm(np.asarray(pooled), axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)  # so the test means something
    assert folder.index.normalize
    assert np.allclose(np.linalg.norm(folder.index.vector(0)), 1.0, atol=1e-5)
    scores, _ = folder.index.search(np.asarray(pooled), len(pooled))
    assert scores.max() <= 1 + 1e-5 and np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_thumbnails_of_files_come_from_the_indexed_file(files_folder, identity):
    folder = open_folder(files_folder, expect=identity)
    for i in range(len(folder.items)):
        key = folder.items.key_of(i)
        orig = Image.open(key)
        thumb = Image.open(io.BytesIO(folder.thumbnails.jpeg(i)))
        assert thumb.format == "JPEG" and max(thumb.size) == min(256, max(orig.size))
        assert folder.items.describe(i) == {"id": i, "key": key, "metadata": {}}
        assert folder.items.id_of(key) == i


def test_parquet_items_keep_their_columns_and_thumbnails_read_the_row(tmp_path, identity):
    photos = write_photos(tmp_path / "photos", n=5, seed=9)
    table = pa.table({"image": [p.read_bytes() for p in photos],
                      "caption": [f"a photo called {p.stem}" for p in photos],
                      "url": [f"https://example.com/{p.name}" for p in photos],
                      "width": pa.array([Image.open(p).size[0] for p in photos], pa.int32())})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "part-0.parquet", row_group_size=2)
    embed(str(tmp_path / "pq"), str(tmp_path / "feats"), MODEL, num_workers=0, progress=False)
    folder = open_folder(tmp_path / "feats", expect=identity)
    for i, p in enumerate(photos):
        item = folder.items.describe(i)
        assert item["key"] == f"part-0.parquet#{i}"
        assert item["metadata"] == {"caption": f"a photo called {p.stem}", "url": f"https://example.com/{p.name}",
                                    "width": Image.open(p).size[0]}
        thumb = Image.open(io.BytesIO(folder.thumbnails.jpeg(i)))
        w, h = Image.open(p).size
        assert abs(thumb.size[0] / thumb.size[1] - w / h) < 0.05
        assert folder.thumbnails.image_bytes(i) == p.read_bytes()  # the row's own bytes


def test_a_folder_that_does_not_fit_is_refused_in_one_line(files_folder, tmp_path, identity):
    def refused(match, *args, **kwargs):
        with pytest.raises(ValueError, match=match) as e:
            open_folder(*args, **kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)

    msg = refused("made with another model, layer or pooling", files_folder,
                  expect={**identity, "select_layer": -2, "pool": "cls"})
    assert "select_layer -1 (server: -2)" in msg and "pool 'model' (server: 'cls')" in msg

    broken = tmp_path / "broken"
    shutil.copytree(files_folder, broken)
    (broken / "pooled" / "000000.npy").unlink()
    refused(r"`mixres verify` fails: pooled/000000.npy: missing", broken, expect=identity)

    refused("not an output folder of mixres embed", tmp_path, expect=identity)

    resized = folder_prep(json.loads((files_folder / "meta.json").read_text()))
    resized.max_image_tokens = 256
    refused(r"resized otherwise than the server resizes queries: --max-image-tokens 1024 \(server: 256\)",
            files_folder, expect=identity, prep=resized)

    meta = json.loads((files_folder / "meta.json").read_text())
    nopool = tmp_path / "nopool"
    embed([str(p) for p in sorted((files_folder / "..").resolve().glob("photos/*"))][:2], str(nopool), MODEL,
          pool="none", num_workers=0, progress=False)
    refused("made with --pool none", nopool)
    assert meta["settings"]["pool"] == "model"
