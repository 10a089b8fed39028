#!/usr/bin/env bash
# Build the `small` preset's bundles for every recipe, then bench them against the PyTorch
# reference (one interleaved run) and verify each. Results: benchmarks/results/.
# Usage: bash benchmarks/run_small.sh [WORKDIR]   (about 15-25 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/salmonn-small}
SX=${SX:-.venv/bin/salmonn-export}
OUT=benchmarks/results
mkdir -p "$WORK" "$OUT"
[ -f "$WORK/model/config.yaml" ] || $SX tiny "$WORK/model" --preset small --seed 0 --force
# a random `tiny` model has no data of its own (no datasets annotation): calibrate and verify on the demo test set
[ -f "$WORK/set/annotation.json" ] || $SX demo-data "$WORK/set" --force > /dev/null
for r in fp32 fp16 w8a16 w4a16 w4a8 w4a16-rtn; do
  [ -f "$WORK/small-$r/manifest.json" ] || $SX build --recipe "$r" --model "$WORK/model/config.yaml" --out "$WORK/small-$r" \
    --calib "$WORK/set/annotation.json" --force --json > /dev/null
  cp "$WORK/small-$r/build_report.json" "$OUT/build_small_$r.json"
done
$SX bench "$WORK/small-fp32" "$WORK/small-w8a16" "$WORK/small-w4a16" "$WORK/small-w4a8" --model "$WORK/model/config.yaml" \
  --warmup "${WARMUP:-3}" --iters "${ITERS:-20}" --stage-iters 5 --out "$OUT/bench_small.json" --markdown "$OUT/bench_small.md"
for r in fp32 fp16 w8a16 w4a16 w4a8 w4a16-rtn; do
  $SX verify "$WORK/small-$r" --model "$WORK/model/config.yaml" --data "$WORK/set/annotation.json" \
    --report "$OUT/verify_small_$r.json" > /dev/null || true
done
