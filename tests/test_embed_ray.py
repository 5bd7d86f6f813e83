"""`mixres embed --engine ray`: on a local Ray cluster it writes the folder the local engine
writes (keys, index, shard files, pooled/, metadata/, features), a kill -9 of its driver
resumes exactly, a shard journaled twice counts once, and without Ray it says how to get it."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import rel_err
from test_embed_sources import write_tars

from mixres.embed import embed, read_features
from mixres.embed.store import merge_index
from mixres.embed.verify import verify
from mixres.workloads import write_photos

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
SMALL = ((24, 90), (24, 90))
KW = dict(backend="packed", max_image_tokens=16, shard_size=2, progress=False)
CLI = ["--model", "tiny-vit", "--max-image-tokens", "16", "--shard-size", "2", "--no-progress"]
N = 7  # photos: 4 shards of 2, the last one short


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray cluster for the module; in-process runs use it, CLI children connect to it."""
    import ray

    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return write_photos(tmp_path_factory.mktemp("photos"), n=N, seed=5, sizes=SMALL)


@pytest.fixture(scope="module")
def local(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local")
    embed([str(p) for p in photos], out, "tiny-vit", **KW)
    return out


def assert_same_folder(out: Path, ref: Path):
    """The same index, files, metadata rows and features (fp32 CPU: <= 1e-5) as `ref`."""
    assert (out / "index.jsonl").read_text() == (ref / "index.jsonl").read_text()
    assert (out / "errors.jsonl").read_text() == (ref / "errors.jsonl").read_text()
    for sub in ("shard-*", "pooled/*", "metadata/*"):
        assert sorted(f.name for f in out.glob(sub)) == sorted(f.name for f in ref.glob(sub))
    assert pq.read_table(out / "metadata").to_pylist() == pq.read_table(ref / "metadata").to_pylist()
    a, b = read_features(out), read_features(ref)
    assert list(a) == list(b)
    for k in b:
        x, y = a[k], b[k]
        assert x.grid_hw == y.grid_hw and x.sha256 == y.sha256, k
        assert rel_err(x.tokens, y.tokens) <= 1e-5 and rel_err(x.pooled, y.pooled) <= 1e-5, k
    assert not list(out.rglob(".*tmp*")) and verify(out) == []
    assert read_features(out).meta["status"]["complete"]


def test_ray_engine_writes_the_local_engines_folder(ray_address, photos, local, tmp_path):
    out = tmp_path / "folder"
    s = embed([str(p) for p in photos], out, "tiny-vit", engine="ray", **KW)
    assert s["images"] == N and s["engine"] == "ray" and s["encoders"] == 1
    # the rate is over the run's wall time (Ray's start-up included); the encoder's own beside it
    assert s["images_per_s"] == pytest.approx(s["images"] / s["seconds"])
    assert 0 < s["encoder_seconds"] <= s["stream_seconds"] <= s["seconds"]
    assert_same_folder(out, local)
    assert [p.name for p in out.glob("progress-r*.jsonl")][0].startswith("progress-rray-")
    # tar shards, and an nn.Module given to the library (shipped to the actors by Ray)
    from mixres.encoders import make_encoder

    write_tars(tmp_path / "tars", photos)
    pattern = str(tmp_path / "tars" / "{000000..000001}.tar")
    embed(pattern, tmp_path / "tar-local", "tiny-vit", **KW)
    module = make_encoder("tiny-vit", max_image_tokens=16).model
    embed(pattern, tmp_path / "tar-ray", module, engine="ray", model_name="tiny-vit", **KW)
    assert_same_folder(tmp_path / "tar-ray", tmp_path / "tar-local")
    # --decode reaches the decode tasks: the same folder as the local engine with that decoder
    embed(pattern, tmp_path / "fast-local", "tiny-vit", decode="fast", **KW)
    embed(pattern, tmp_path / "fast-ray", "tiny-vit", engine="ray", decode="fast", **KW)
    assert_same_folder(tmp_path / "fast-ray", tmp_path / "fast-local")
    assert read_features(tmp_path / "fast-ray").meta["settings"]["decode"] == "fast"


def run_cli(inp, out, ray_address, kill=None, extra=()):
    """`mixres embed --engine ray` in a child; kill=(stage, n): its actor kills it at that point."""
    how = ["-m", "mixres", "embed"] if kill is None else [str(ROOT / "tests" / "embed_child.py"), kill[0],
                                                          str(kill[1])]
    cmd = [sys.executable, *how, str(inp), "--out", str(out), *CLI, "--engine", "ray",
           "--ray-address", ray_address, *extra]
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": PYTHONPATH},
                          capture_output=True, text=True, timeout=300)


def test_local_torchrun_and_ray_engines_write_one_folder(ray_address, photos, local, tmp_path):
    """The three engines run through the one driver: the same settings, fingerprint and folder."""
    inp = tmp_path / "list.txt"
    inp.write_text("\n".join(map(str, photos)))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(29600 + os.getpid() % 1000),
                        "-m", "mixres", "embed", str(inp), "--out", str(tmp_path / "torchrun"), *CLI,
                        "--device", "cpu", "--num-workers", "0"],
                       env={**os.environ, "PYTHONPATH": PYTHONPATH}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    embed(inp, tmp_path / "ray", "tiny-vit", engine="ray", **KW)
    meta = lambda d: json.loads((d / "meta.json").read_text())  # noqa: E731
    for out in (tmp_path / "torchrun", tmp_path / "ray"):
        assert_same_folder(out, local)
        assert meta(out)["fingerprint"] == meta(local)["fingerprint"]
        assert meta(out)["settings"] == meta(local)["settings"]
    assert sorted(p.name for p in (tmp_path / "torchrun").glob("progress-r*")) == ["progress-r0.jsonl",
                                                                                  "progress-r1.jsonl"]


def test_kill_9_of_the_driver_then_resume_is_exact(ray_address, photos, local, tmp_path):
    inp = tmp_path / "list.txt"
    inp.write_text("\n".join(map(str, photos)))
    out = tmp_path / "out"
    r = run_cli(inp, out, ray_address, kill=("journaled", 1))
    assert r.returncode == -signal.SIGKILL, r.stderr
    journaled = sum(len(p.read_text().splitlines()) for p in out.glob("progress-r*.jsonl"))
    assert journaled == 1 and not (out / "index.jsonl").exists()
    r = run_cli(inp, out, ray_address)
    assert r.returncode == 0, r.stderr
    assert "shards were already done" in r.stdout
    assert_same_folder(out, local)


def test_a_shard_journaled_twice_is_one_shard(local, tmp_path):
    # a Ray task retried after its first attempt journaled: a second journal holds the same record
    out = tmp_path / "twice"
    shutil.copytree(local, out)
    first = (out / "progress-r0.jsonl").read_text().splitlines()[1]
    (out / "progress-rray-retried.jsonl").write_text(first + "\n")
    assert json.loads(first)["shard"] == 1
    assert merge_index(out) == (N, 0)
    assert (out / "index.jsonl").read_text() == (local / "index.jsonl").read_text()
    assert verify(out) == []


def test_without_ray_the_engine_says_how_to_install_it(photos, tmp_path, monkeypatch, capsys):
    from mixres.cli import main

    real = builtins.__import__

    def no_ray(name, *args, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    for mod in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, mod)
    out = tmp_path / "out"
    assert main(["embed", str(photos[0].parent), "--out", str(out), *CLI, "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mixres embed: error: --engine ray needs Ray Data: pip install 'mixres[ray]' "
                   "(or pip install 'ray[data]')"]
    assert not out.exists()  # nothing written before the check


def test_on_error_fail_stops_the_ray_run_with_one_line(ray_address, photos, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(os.urandom(2000))
    with pytest.raises(ValueError) as e:
        embed([str(photos[0]), str(bad)], tmp_path / "out", "tiny-vit", engine="ray", on_error="fail", **KW)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: ") and "--on-error fail" in msg
    out = tmp_path / "out"  # nothing half-written: only the status says the run did not complete
    assert [p for p in verify(out) if not p.startswith("meta.json: ")] == [] and not list(out.rglob(".*tmp*"))
    assert not read_features(out).meta["status"]["complete"]


def test_bad_ray_arguments_fail_in_one_line_before_any_work(photos, tmp_path):
    for kw, name in [({"ray_actors": 0}, "--ray-actors"),
                     ({"ray_cpus_per_decode": 0}, "--ray-cpus-per-decode"),
                     ({"ray_cpus_per_actor": 0}, "--ray-cpus-per-actor")]:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            embed([str(p) for p in photos], tmp_path / "out", "tiny-vit", engine="ray", **KW, **kw)
    assert not (tmp_path / "out").exists()
