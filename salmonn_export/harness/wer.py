"""Word edit distance (used by `verify` to compare engine and reference texts word by word).

The challenge's own WER (Whisper normaliser + sacrebleu 13a) belongs to the scoring code; here
both sides are already the same model's post-processed output, so lowercased whitespace words
are the right unit.
"""

from __future__ import annotations


def edit_distance(a: list[str], b: list[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edits, reference words) on lowercased whitespace-split words."""
    ref = reference.lower().split()
    return edit_distance(ref, hypothesis.lower().split()), len(ref)
