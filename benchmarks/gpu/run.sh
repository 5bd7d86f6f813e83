#!/usr/bin/env bash
# On the GPU box, from the checkout root, with benchmarks/gpu/wheels carried along:
#   bash benchmarks/gpu/run.sh h200        -> benchmarks/results/gpu-h200/
# Installs the kit offline into a folder of its own (no dependency resolution, nothing from
# the network, the box's own packages untouched), then runs the suite within its 8-minute
# budget. results.json is written after every section, so a section that fails or a run cut
# short still leaves what came before. Extra arguments go to `mixres bench gpu`.
set -uo pipefail
NAME=${1:?usage: bash benchmarks/gpu/run.sh <gpu name> [mixres bench gpu arguments]}
shift
cd "$(dirname "$0")/../.."
# the box's Python is `python3` (a bare image need not have `python`)
PY=${PYTHON:-$(command -v python3 || command -v python)}
SITE=${KIT_SITE:-/tmp/mixres-gpu-kit}
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" benchmarks/gpu/wheels/*.whl || exit
export PYTHONPATH="$PWD:$SITE"
timeout "${KIT_TIMEOUT:-470}" "$PY" -m mixres bench gpu --out "benchmarks/results/gpu-$NAME" "$@"
status=$?
ls -l "benchmarks/results/gpu-$NAME"
exit $status
