"""Pilot (issue 17): does a CTC teacher with smaller text units read unseen words better?

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/demo_model/pilot_units.py --vocab 1000
    # appends to benchmarks/results/demo_units_pilot.{json,md}; one run per --vocab (4000 = the shipped BPE size)

`coverage.py` found that the acoustic path learned words, not spelling: held-out words heard fewer
than 10 times in training are read ~10 % of the time by the CTC teacher. With a 4,000-merge BPE most
words are one or two units, so a rare word is a rare unit. This trains the same PoolTeacher
(`reader.train_teacher`'s clips, seed, batch, learning rate, schedule) on a byte-level BPE of
--vocab units built by `lm.train_tokenizer` from the same corpus, its CTC head starting from random
unit vectors (no LLM exists for these units; run --vocab 4000 for the control with the same start),
and scores greedy CTC WER and word recall by training count (`coverage.py`) on the diagnosis sets.
Smaller units mean more of them per second: 6-frame windows give 8.3 per second, 1,000 units 6.8
tokens per second of single-sentence speech, 500 units 8.5 (too many for CTC to align).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import coverage  # noqa: E402
import diagnose  # noqa: E402
import lm  # noqa: E402
import pilot_teacher  # noqa: E402
import reader  # noqa: E402
import stage2  # noqa: E402

HIDDEN = 256  # the demo LLM's width: the teacher's projection is the same size as in the shipped run


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    work = args.work.resolve()
    lm.BPE_VOCAB = args.vocab
    tok = lm.train_tokenizer(lm.corpus(work)[0])
    blank = len(tok)
    feats = stage2.Features(work)
    sets = diagnose.pick_clips(feats, 100, 50, args.seed)
    torch.manual_seed(args.seed)
    table = torch.nn.functional.normalize(torch.randn(blank + 1, HIDDEN), dim=-1)
    teacher = reader.PoolTeacher(feats.whisper_width, HIDDEN, table, blank, diagnose.WINDOW_FRAMES)
    asr, opt, sched = reader.teacher_setup(teacher, feats, args.seed, args.steps, args.lr)
    losses, t0, curve = [], time.time(), {}
    for step in range(args.steps):
        reader.teacher_step(teacher, feats, asr, tok, step, args.seed, args.batch, opt, sched, losses)
        if (step + 1) % 100 == 0:
            curve[str(step + 1)] = round(float(np.mean(losses[-100:])), 3)
            print(f"vocab {args.vocab} step {step + 1}: ctc {curve[str(step + 1)]} ({time.time() - t0:.0f} s)", flush=True)
    counts, _ = coverage.training_word_counts(feats.clips)
    teacher.eval()
    result = {"vocab": len(tok), "steps": args.steps, "seconds": round(time.time() - t0, 1), "train_ctc_loss": curve}
    for name, index in sets.items():
        hyps, _ = pilot_teacher.readout(teacher, feats, index, tok)
        refs = [feats.clips[i]["text"].lower() for i in index]
        scored = diagnose.score(hyps, refs, [feats.clips[i]["voice"] for i in index])
        result[name] = {"wer": scored["wer"], "cer": scored["cer"],
                        "recall_by_training_count": coverage.recall_by_bucket(refs, hyps, counts),
                        "examples": [{"ref": r, "hyp": h} for r, h in zip(refs[:3], hyps[:3])]}
    return result


def write_results(out: Path, runs: list[dict]) -> None:
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    names = [name for _, _, name in coverage.BUCKETS]
    rows = ["| units | steps | unseen sentences WER (CER) | unseen voices WER (CER) | seen WER | "
            + " | ".join(f"recall, heard {n}" for n in names) + " |", "|---|---|---|---|---|" + "---|" * len(names)]
    for r in sorted(runs, key=lambda r: r["vocab"]):
        cells = [f"{r[s]['wer'] * 100:.1f} % ({r[s]['cer'] * 100:.0f} %)" for s in diagnose.SETS[:2]]
        recall = r["heldout_sentences"]["recall_by_training_count"]
        rows.append(f"| {r['vocab']} | {r['steps']} | {cells[0]} | {cells[1]} | {r['train_seen']['wer'] * 100:.1f} % | "
                    + " | ".join(f"{recall[n]['recall'] * 100:.0f} %" for n in names) + " |")
    out.with_suffix(".md").write_text("\n".join([
        "# Demo CTC teacher with smaller text units (issue 17 pilot)", "",
        "`benchmarks/demo_model/pilot_units.py`: the shipped run's PoolTeacher and schedule on byte-level BPEs of "
        "different sizes (CTC head from random unit vectors), greedy CTC on the `diagnose.py` sets. Recall columns: "
        "unseen-sentence words by their count in the training speech (`coverage.py`). The shipped teacher "
        "(4,000 units, head from the LLM's embeddings, 600 steps): 52.3 % / 54.1 % / 13.3 %.", "", *rows, ""]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/demo_data/natural"), help="train_natural.py work folder")
    ap.add_argument("--vocab", type=int, required=True, help="BPE vocabulary size (the shipped demo: 4000)")
    ap.add_argument("--steps", type=int, default=600, help="the shipped teacher's steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_units_pilot")
    args = ap.parse_args()
    result = train(args)
    path = args.out.with_suffix(".json")
    runs = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["vocab"] != result["vocab"]]
    write_results(args.out, runs + [result])
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
