"""The `mixres` command line keeps freed activation memory mapped: a forward's large tensors
land on warm pages instead of page-faulting fresh ones (mixres/allocator.py)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")

# 40 MB tensors made, written and freed over and over, as a forward's activations are.
# Above 32 MB, glibc's own limit for its moving mmap threshold, so by default every one is a
# fresh mmap; at 25 MB whether glibc trims them back depended on the heap's layout (a CI run
# saw 0 faults by default)
CHURN = """
import resource, sys, torch
from mixres.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def churn():
    for _ in range(20):
        a = torch.empty(10 << 20)  # 40 MB of float32
        a.fill_(1.0)
        b = a * 2  # another, while the first lives
        del a, b
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(mode: str, **env) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_activations_come_back_without_page_faults():
    applied, faults = _run("keep")
    assert applied
    _, faults_default = _run("default")
    # default glibc: each 40 MB block is a fresh mmap, ~10,000 faults each time it is written
    assert faults_default > 50_000
    assert faults < 1_000


@pytest.mark.parametrize("env", [{"MIXRES_MALLOC": "0"}, {"MALLOC_TRIM_THRESHOLD_": "1000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"}])
def test_the_users_own_choice_wins(monkeypatch, env):
    from mixres import allocator

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(allocator, "_applied", [])
    assert not allocator.keep_freed_memory()


def test_the_command_line_applies_it():
    from mixres import allocator, cli

    allocator._applied.clear()
    cli.main(["presets"])
    assert allocator._applied == [True]
