#!/usr/bin/env bash
# On the GPU box, from the checkout root, with benchmarks/gpu/wheels carried along:
#   bash benchmarks/gpu/run.sh h200        -> benchmarks/results/gpu-h200/
# Installs the kit offline (no dependency resolution, nothing from the network), then runs
# the suite within its 8-minute budget. results.json is written after every section, so a
# section that fails or a run cut short still leaves what came before.
set -uo pipefail
NAME=${1:?usage: bash benchmarks/gpu/run.sh <gpu name>}
cd "$(dirname "$0")/../.."
python -m pip install --no-index --no-deps --quiet benchmarks/gpu/wheels/*.whl
PYTHONPATH=. timeout 470 python -m mixres bench gpu --out "benchmarks/results/gpu-$NAME"
status=$?
ls -l "benchmarks/results/gpu-$NAME"
exit $status
