#!/usr/bin/env bash
# The PyTorch engine on a lent GPU, in one run (budget BUDGET_S, default 470 s): inventory, copy bandwidth,
# `small` (and `challenge-1b` when that preset exists) torch bundles, texts vs the reference and the
# challenge's protocol per system (each in its own process), TensorRT when present, summary.
# Results: $OUT/gpu_torch_engine_<gpu>.{json,md} plus one JSON per step; copy them to benchmarks/results/.
#
#   OUT=/tmp/out bash benchmarks/gpu/run_gpu_engine.sh        # through the device tool: run(command=...)
set -u
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/gpu-engine-out} WORK=${WORK:-/tmp/gpu-engine-work} PYTHONPATH=$PWD
export TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
BUDGET_S=${BUDGET_S:-470}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
: > "$OUT/skipped.txt"; : > "$OUT/errors.txt"

# step SECONDS_NEEDED LABEL ARGS...: run one python step if the budget still has SECONDS_NEEDED left
step() {
  local need=$1 label=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if (( left < need )); then
    echo "$label: skipped, ${left} s of the budget left (needs ~${need} s)" | tee -a "$OUT/skipped.txt"
    return 1
  fi
  echo "== $label (${left} s left)"
  if ! timeout "$left" "$PY" benchmarks/gpu/torch_engine_gpu.py "$@" 2> >(tail -n 25 > "$OUT/stderr_${label//[^A-Za-z0-9_.-]/_}.txt"); then
    echo "$label: failed (see stderr_${label//[^A-Za-z0-9_.-]/_}.txt)" | tee -a "$OUT/errors.txt"
    return 1
  fi
}

step 20 inventory inventory
step 20 bandwidth bandwidth
# the issue's targets first (small: reference + int4 engine; challenge-1b), variants after
small=0
if step 60 prepare-small prepare small; then
  small=1
  step 60 "small-reference" system small reference
  step 60 "small-torch:w4a16-rtn" system small torch:w4a16-rtn
fi
if "$PY" -c "from salmonn_export.model.tiny import PRESETS; assert 'challenge-1b' in PRESETS" 2>/dev/null; then
  if step 200 prepare-challenge-1b prepare challenge-1b; then
    step 90 "challenge-1b-reference" system challenge-1b reference
    step 90 "challenge-1b-torch:w4a16-rtn" system challenge-1b torch:w4a16-rtn
  fi
else
  echo "challenge-1b: preset not in this tree" | tee -a "$OUT/skipped.txt"
fi
if (( small )); then
  step 60 "small-torch:fp32" system small torch:fp32
  step 60 "small-torch:w4a16-rtn+enc" system small torch:w4a16-rtn+enc
fi
step 60 tensorrt tensorrt small
timeout 60 "$PY" benchmarks/gpu/torch_engine_gpu.py summary || echo "summary failed" | tee -a "$OUT/errors.txt"
rm -rf "$WORK"
echo "done in ${SECONDS} s"
