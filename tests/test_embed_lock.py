"""One writer per folder, and a lock that dies with its process: kill -9 of a run while its
DataLoader workers are busy, then an immediate rerun (what a requeue loop does) resumes.

The stress run of the same test (20 rounds): `pytest -m stress tests/test_embed_lock.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mixres.embed import embed
from mixres.embed.lock import FolderLock
from mixres.embed.verify import verify
from mixres.workloads import write_photos

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
CLI = ["--model", "tiny-vit", "--max-image-tokens", "16", "--shard-size", "2", "--num-workers", "2",
       "--no-progress"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, n=12, seed=8, sizes=((24, 160), (24, 160)))
    return folder


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    embed(photos, out, "tiny-vit", max_image_tokens=16, shard_size=2, progress=False, num_workers=0)
    return out


def _kill_then_rerun(photos, reference, out):
    # killed right after its first shard is journaled, while its two workers decode the next shards
    out.mkdir()
    with open(out.parent / f"{out.name}.log", "w") as log:  # not a pipe: the orphans keep pipes open
        child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "embed_child.py"), "journaled", "1",
                                  str(photos), "--out", str(out), *CLI], stdout=log, stderr=log,
                                 env={**os.environ, "PYTHONPATH": PYTHONPATH})
        assert child.wait(timeout=180) == -signal.SIGKILL, (out.parent / f"{out.name}.log").read_text()
    # at once, in this already started process: the orphaned workers have not noticed yet
    s = embed(photos, out, "tiny-vit", max_image_tokens=16, shard_size=2, progress=False, num_workers=2)
    assert s["done_before"] == 1
    assert (out / "index.jsonl").read_text() == (reference / "index.jsonl").read_text()
    assert verify(out) == []


STRESS = [pytest.param(i, marks=pytest.mark.stress) for i in range(3, 23)]


@pytest.mark.parametrize("round_", [*range(3), *STRESS])
def test_kill_9_then_an_immediate_rerun_resumes(photos, reference, tmp_path, round_):
    """3 rounds in the default run; `pytest -m stress` runs 20 more."""
    _kill_then_rerun(photos, reference, tmp_path / "out")


def test_the_lock_is_one_per_folder_within_a_process_too(tmp_path):
    held = FolderLock(tmp_path).acquire()
    try:
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
            FolderLock(tmp_path).acquire()
    finally:
        held.release()
    FolderLock(tmp_path).acquire().release()  # released: the next run goes
