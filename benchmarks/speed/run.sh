#!/usr/bin/env bash
# The CPU speed sweep of docs/bench.md: packed vs the dense oracle, HF NaFlex (SigLIP2), timm
# NaFlexViT and the per-image loop, for four token ranges and the words workload. Each run
# is one `mixres bench throughput` (methods interleaved round-robin, median of --repeats).
#   bash benchmarks/speed/run.sh [out-dir]     (default benchmarks/results/speed-cpu)
set -u
OUT=${1:-benchmarks/results/speed-cpu}
NAFLEX=(--model timm:naflexvit_base_patch16_gap --model-kwargs '{"pretrained": false}')
run() {  # range n model-args...
  local range=$1 n=$2; shift 2
  local name=$2; name=${name//[:\/]/-}
  mixres bench throughput --tokens "$range" -n "$n" --repeats 5 "$@" --out "$OUT/$range/$name" \
    || echo "FAILED: $range $*"
}
for spec in "1-16 160" "16-64 40" "64-256 12" "64-1024 6"; do
  set -- $spec
  run "$1" "$2" --model vit-b16 --methods packed,oracle,loop
  run "$1" "$2" --model siglip2-b16 --methods packed,hf-naflex,oracle,loop
  run "$1" "$2" --model dinov2-s14 --methods packed,oracle,loop
  run "$1" "$2" "${NAFLEX[@]}" --methods packed,timm-naflex,oracle
done
mixres bench throughput --workload words -n 160 --repeats 5 --model vit-b16 --methods packed,oracle,loop \
  --out "$OUT/words/vit-b16" || echo "FAILED: words"
