"""Issue 17: which held-out words each stage reads, by how often the word was heard in training.

    .venv/bin/python benchmarks/demo_model/coverage.py --work /work/demo_data/natural
    # reads benchmarks/results/demo_diagnosis.json (diagnose.py), writes demo_coverage.{json,md}

`diagnose.py` showed that the acoustic path loses most words and reads its training sentences far
better than unseen ones. This splits the held-out reference words by their count in the training
speech (every utterance of every training ASR clip, packed segments included, normalised as the
challenge's `compute_wer` does) and gives, per bucket and per stage, the fraction of those words an
aligned hypothesis gets exactly right (word recall). If recall rises steeply with the count, the
acoustic model learned words rather than to read, and the remedy is speech that covers more words
more often; if it is flat, the limit is elsewhere.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnose import align  # noqa: E402

from salmonn_export.harness.metrics import wer_tokens  # noqa: E402

BUCKETS = ((0, 0, "never"), (1, 2, "1-2"), (3, 9, "3-9"), (10, 99, "10-99"), (100, 999, "100-999"),
           (1000, None, "1000+"))
HELDOUT_SETS = ("heldout_sentences", "heldout_voices")


def bucket(count: int) -> str:
    for low, high, name in BUCKETS:
        if count >= low and (high is None or count <= high):
            return name
    raise ValueError(count)


def training_word_counts(clips: list[dict]) -> tuple[collections.Counter, dict]:
    """Word counts over every training-split ASR utterance (a packed clip's segments one by one).

    This includes the 48 validation sentences and the 31 packed clips holding them that
    `reader._split` keeps out of training: counted without them, recall moves by at most 2 points."""
    counts: collections.Counter = collections.Counter()
    utterances = set()
    for clip in clips:
        if clip["split"] == "train" and clip["task"] == "asr":
            for segment in clip.get("segments", [clip]):
                utterances.add(segment["text"])
                counts.update(wer_tokens(segment["text"]))
    return counts, {"distinct_utterances": len(utterances), "word_tokens": sum(counts.values()),
                    "distinct_words": len(counts)}


def recall_by_bucket(refs: list[str], hyps: list[str], counts: collections.Counter) -> dict:
    """Per bucket: reference words, words matched by the alignment, recall."""
    words = collections.Counter()
    hits = collections.Counter()
    for ref_text, hyp_text in zip(refs, hyps, strict=True):
        ref = wer_tokens(ref_text)
        _, hit = align(ref, wer_tokens(hyp_text))
        for word, matched in zip(ref, hit):
            words[bucket(counts[word])] += 1
            hits[bucket(counts[word])] += matched
    return {name: {"words": words[name], "hits": hits[name],
                   "recall": round(hits[name] / words[name], 3) if words[name] else None}
            for _, _, name in BUCKETS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/demo_data/natural"), help="train_natural.py work folder")
    ap.add_argument("--diagnosis", type=Path, default=ROOT / "benchmarks" / "results" / "demo_diagnosis.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_coverage")
    args = ap.parse_args()
    diagnosis = json.loads(args.diagnosis.read_text())
    counts, totals = training_word_counts(json.loads((args.work / "clips.json").read_text()))
    report = {"training_speech": totals, "stages": {}}
    for stage, by_set in diagnosis["hyps"].items():
        report["stages"][stage] = {name: recall_by_bucket(diagnosis["refs"][name], by_set[name], counts)
                                   for name in HELDOUT_SETS if name in by_set}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report, diagnosis))
    print(args.out.with_suffix(".md").read_text())


def markdown(report: dict, diagnosis: dict) -> str:
    names = [name for _, _, name in BUCKETS]
    t = report["training_speech"]
    first = report["stages"]["whisper_decoder"]["heldout_sentences"]
    share = " / ".join(f"{name} {first[name]['words']}" for name in names)
    lines = ["# Demo SALMONN: held-out word recall by how often the word was heard in training", "",
             "`benchmarks/demo_model/coverage.py` on the hypotheses of `demo_diagnosis.json`. Training speech: "
             f"{t['distinct_utterances']:,} distinct utterances, {t['word_tokens']:,} spoken words, "
             f"{t['distinct_words']:,} distinct words (challenge normaliser). Held-out reference words of the "
             f"unseen-sentence set by training count: {share}.", "",
             "Recall = reference words an aligned hypothesis gets exactly right. Cells: unseen sentences / "
             "unseen voices.", "",
             "| stage | " + " | ".join(f"heard {n}" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for stage, sets in report["stages"].items():
        cells = []
        for name in names:
            values = [sets[s][name]["recall"] for s in HELDOUT_SETS if s in sets]
            cells.append(" / ".join("-" if v is None else f"{v * 100:.0f} %" for v in values))
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
