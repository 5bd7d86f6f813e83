#!/usr/bin/env bash
# VLM training step (forward + backward) packed vs padded: the built-in decoder and an HF
# Llama of its shape, joint_decoder and mot, CPU.   bash benchmarks/speed/vlm.sh [out-dir]
set -u
OUT=${1:-benchmarks/results/vlm-cpu}
for lm in builtin hf-llama; do
  for strategy in joint_decoder mot; do
    mixres bench vlm --lm $lm --strategy $strategy --threads 1 --rounds 5 --out "$OUT/$lm-$strategy" \
      || echo "FAILED: $lm $strategy"
  done
done
