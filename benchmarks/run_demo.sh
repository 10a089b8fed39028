#!/usr/bin/env bash
# Build the demo SALMONN's bundles for every recipe; verify each against the PyTorch reference on
# the demo test set, and score the reference and each bundle on the training run's held-out set.
# Usage: bash benchmarks/run_demo.sh HELDOUT_ANNOTATION.json [WORKDIR]
#   HELDOUT_ANNOTATION.json: written by benchmarks/demo_model/train.py (WORK/heldout.json)
set -euo pipefail
cd "$(dirname "$0")/.."
HELDOUT=$1
WORK=${2:-/tmp/salmonn-demo}
SX=${SX:-.venv/bin/salmonn-export}
OUT=benchmarks/results
RECIPES=${RECIPES:-fp32 fp16 w8a16 w8a8 w4a16 w4a16-lmhead w4a8 w4a8-lmhead w4a8-int8enc w4a16-rtn w4a16-textcalib}
LIMIT=${LIMIT:-50}   # held-out items per task
mkdir -p "$WORK" "$OUT"
[ -f "$WORK/set/annotation.json" ] || $SX demo-data "$WORK/set" > /dev/null
for r in $RECIPES; do
  CALIB=(); [ "$r" = w4a16-textcalib ] && CALIB=(--calib "$WORK/set/annotation.json")  # text-only calibration needs texts
  [ -f "$WORK/demo-$r/manifest.json" ] || $SX build --recipe "$r" "${CALIB[@]}" --out "$WORK/demo-$r" --force --json > /dev/null
  cp "$WORK/demo-$r/build_report.json" "$OUT/build_demo_$r.json"
  # a rerun keeps a verify report newer than its bundle (resumable)
  [ "$OUT/verify_demo_$r.json" -nt "$WORK/demo-$r/manifest.json" ] ||
    $SX verify "$WORK/demo-$r" --data "$WORK/set/annotation.json" --report "$OUT/verify_demo_$r.json" > /dev/null || true
done
DEMO_CONFIG=$(.venv/bin/python -c "from salmonn_export.model.demo import ensure_demo_model; print(ensure_demo_model())")
for task in asr aac; do
  $SX eval --task $task --model "$DEMO_CONFIG" --annotation "$HELDOUT" --limit "$LIMIT" --out "$WORK/heldout_reference_$task.csv" --json > "$OUT/heldout_demo_reference_$task.json"
  for r in $RECIPES; do
    $SX eval --task $task --engine "$WORK/demo-$r" --annotation "$HELDOUT" --limit "$LIMIT" --out "$WORK/heldout_${r}_$task.csv" \
      --json > "$OUT/heldout_demo_${r}_$task.json"
  done
done
.venv/bin/python benchmarks/summarize_demo.py "$OUT" > "$OUT/demo_recipes.md"
cat "$OUT/demo_recipes.md"
