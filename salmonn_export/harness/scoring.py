"""Scoring a submission as the challenge does, after the submission checks (shared by `score` and `eval`).

Order: read the CSV as the challenge's reader does → every `validate-submission` check against the
annotation (columns, ids, texts pandas reads as strings, duplicates, missing and unknown ids) →
only then the metric (`metrics.py`). Nothing is computed for an invalid submission.
"""

from __future__ import annotations

from pathlib import Path

from salmonn_export.dataset import Example
from salmonn_export.errors import SalmonnError
from salmonn_export.harness.metrics import compute_spider, compute_wer, standard_cider_d
from salmonn_export.harness.submission import checked_submission


def score_texts(task: str, hyps: list[str], refs: list[str]) -> dict:
    """`compute_wer` (task asr) or the challenge's "SPIDEr" (aac) plus standard CIDEr-D where available.

    Raises SalmonnError where the metric is undefined (no reference words for WER; fewer than 2 items
    for CIDEr-D)."""
    if task == "asr":
        return compute_wer(hyps, refs)
    result = compute_spider(hyps, refs)
    std = standard_cider_d(hyps, refs)
    result["standard_cider_d"] = std if std is not None else "pycocoevalcap not installed"
    result["spice"] = "not computed: SPICE needs Java and Stanford CoreNLP models, never downloaded at run time"
    return result


def score_submission(submission: str | Path, examples: list[Example], task: str,
                     annotation: str | Path | None = None, require_references: bool = True) -> dict:
    """Check `submission` against `examples` (the ids it must hold: one task's annotation items), then
    score the items that have a reference `text`.

    Returns `score_texts`' result (without per-item details) plus `scored_items`, and `items`:
    `[{"testset_id", "reference", "hypothesis", ...per-item metric}]` in annotation order.
    Raises SalmonnError naming the submission when it breaks a check, or naming `annotation` when an
    item lacks its reference (with `require_references`) or none has one."""
    rows = dict(checked_submission(submission, examples))
    scored = [e for e in examples if e.text is not None]
    lacking = len(examples) - len(scored)
    if (lacking and require_references) or not scored:
        example = next(e.testset_id for e in examples if e.text is None)
        raise SalmonnError(f"{lacking} annotation items have no reference `text`, e.g. {example!r}", annotation)
    hyps = [rows[e.testset_id] for e in scored]
    result = score_texts(task, hyps, [e.text for e in scored])
    details = result.pop("items")
    result["scored_items"] = len(scored)
    result["items"] = [{"testset_id": e.testset_id, "reference": e.text, "hypothesis": h,
                        **(d if isinstance(d, dict) else {"cider_d": d})} for e, h, d in zip(scored, hyps, details)]
    return result
