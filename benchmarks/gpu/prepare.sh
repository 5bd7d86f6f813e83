#!/usr/bin/env bash
# On a machine with pip and a mixres[test] environment: fetch into benchmarks/gpu/wheels
# (ignored by git) exactly the wheels `mixres bench gpu` needs that a bare Python 3.12 GPU
# box (torch, transformers, timm, pyarrow) lacks: CPython 3.12, manylinux x86_64, no Ray,
# under 64 MiB. The selection is mixres/bench/gpu_kit.py (`... gpu_kit list` prints it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHONPATH=. python -m mixres.bench.gpu_kit download --dest benchmarks/gpu/wheels
du -sh benchmarks/gpu/wheels
