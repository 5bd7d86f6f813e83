#!/usr/bin/env bash
# The CPU speed sweep of docs/bench.md: packed vs the dense oracle (every range), the
# per-image loop, HF NaFlex (SigLIP2) and timm NaFlexViT, for four token ranges and the
# words workload. Each run is one `mixres bench throughput` (methods interleaved
# round-robin, median of --repeats), most important first.
#   [REPEATS=5] bash benchmarks/speed/run.sh [out-dir]   (default benchmarks/results/speed-cpu; 3 rounds)
set -u
OUT=${1:-benchmarks/results/speed-cpu}
NAFLEX=(--model timm:naflexvit_base_patch16_gap --model-kwargs '{"pretrained": false}')
run() {  # range n model-args...
  local range=$1 n=$2; shift 2
  local name=$2; name=${name//[:\/]/-}
  mixres bench throughput --tokens "$range" -n "$n" --repeats "${REPEATS:-3}" "$@" --out "$OUT/$range/$name" \
    || echo "FAILED: $range $*"
}
run 1-16 96 --model vit-b16 --methods packed,oracle,oracle-prepacked,loop
run 16-64 32 --model vit-b16 --methods packed,oracle,oracle-prepacked
run 64-256 10 --model vit-b16 --methods packed,oracle,oracle-prepacked
run 64-1024 4 --model vit-b16 --methods packed,oracle,oracle-prepacked,oracle-224
run 1-16 96 --model siglip2-b16 --methods packed,hf-naflex,oracle,oracle-prepacked
run 1-16 96 "${NAFLEX[@]}" --methods packed,timm-naflex,oracle,oracle-prepacked
mixres bench throughput --workload words -n 64 --repeats "${REPEATS:-3}" --model vit-b16 --methods packed,oracle,oracle-prepacked \
  --out "$OUT/words/vit-b16" || echo "FAILED: words"
run 1-16 96 --model dinov2-s14 --methods packed,oracle,oracle-prepacked
run 16-64 32 --model siglip2-b16 --methods packed,hf-naflex,oracle,oracle-prepacked
run 64-256 10 --model siglip2-b16 --methods packed,hf-naflex,oracle,oracle-prepacked
