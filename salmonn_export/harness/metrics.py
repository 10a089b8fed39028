"""The challenge's metrics, reproduced exactly (spec section 5), plus standard CIDEr-D for comparison.

WER: OpenAI Whisper's `EnglishTextNormalizer` on both sides → sacrebleu 13a tokenisation → drop
tokens made only of Unicode punctuation → lowercase → split; corpus-level Σ edits / Σ reference words.
The challenge's `metrics.py` carries a verbatim copy of OpenAI's normaliser and its British→American
map (`data/english.json`). We use transformers' copy of the normaliser code
(`transformers.models.whisper.english_normalizer`; same rules as OpenAI's
`whisper/normalizers/english.py`, which differs only in formatting, in `more_itertools.windowed`
replaced by an equivalent index loop and in two asserts that cannot fire) with OpenAI's map, vendored
as `whisper_english_spelling.json` (OpenAI whisper, MIT licence, `whisper/normalizers/english.json`,
unchanged since commit ea1c266 of Jan 2023). The `whisper-normalizer` package is NOT used: it adds
rules (kinda → kind of, sorta, dunno, cause) that the challenge's copy lacks.
`tests/test_metrics_normaliser.py` checks it against a verbatim copy of OpenAI's code on a generated corpus.

A reference set that normalises to no words at all makes corpus WER undefined (the challenge's
`compute_wer` divides by zero there): `compute_wer` raises `SalmonnError`. A single empty reference
among others counts its hypothesis words as insertions, as the challenge does.

"SPIDEr": the challenge's adaptation of aac-metrics' CIDEr-D: hypotheses lowercased, references
raw, `str.split` tokens, n = 1..4, document frequencies over references, "length" = bigram count,
sigma 6, scale 10, reported as CIDEr-D × 100 rounded to 4 decimals. No SPICE. An empty reference
scores 0 for its item whatever the hypothesis (the challenge's arithmetic); the number of such
references is reported as `empty_references`.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

from salmonn_export.errors import SalmonnError

SPELLING_MAP = Path(__file__).with_name("whisper_english_spelling.json")


@lru_cache(maxsize=1)
def _normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(json.loads(SPELLING_MAP.read_text(encoding="utf-8")))


def normalize_english(text: str) -> str:
    """The challenge's Whisper English normalisation of one text (no strip: it may keep edge spaces)."""
    return _normalizer()(text)


@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def _is_punctuation(token: str) -> bool:
    return all(unicodedata.category(c).startswith("P") for c in token)


def wer_tokens(text: str) -> list[str]:
    """Normalise and tokenise one side as the challenge's `compute_wer` does."""
    normalized = normalize_english(text)
    tokens = _tokenizer_13a()(normalized).split(" ")
    kept = " ".join(t for t in tokens if t and not _is_punctuation(t))
    return kept.lower().split()


def edit_distance(a: list[str], b: list[str]) -> int:
    import editdistance

    return int(editdistance.eval(a, b))


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edits, reference words) on lowercased whitespace words: how `verify` compares two outputs of
    the same model, where normalisation would only hide differences."""
    ref = reference.lower().split()
    return edit_distance(ref, hypothesis.lower().split()), len(ref)


def compute_wer(hyps: list[str], refs: list[str]) -> dict:
    """Corpus WER as the challenge's `compute_wer`: Σ edits / Σ reference words over normalised tokens.

    Returns `wer` (fraction), `wer_percent` (rounded to 4 decimals as the challenge prints it),
    `errors`, `ref_words`, `empty_references` (items whose reference normalises to no words: their
    hypothesis words count as insertions) and per-item `items`.
    Raises SalmonnError when the lists differ in length, are empty, or when every reference
    normalises to no words (WER over nothing is undefined; the challenge divides by zero there).
    """
    if len(hyps) != len(refs):
        raise SalmonnError(f"{len(hyps)} hypotheses for {len(refs)} references")
    if not refs:
        raise SalmonnError("no items to score")
    errors = words = empty = 0
    items = []
    for h, r in zip(hyps, refs):
        rt, ht = wer_tokens(r), wer_tokens(h)
        e = edit_distance(rt, ht)
        errors += e
        words += len(rt)
        empty += not rt
        items.append({"errors": e, "ref_words": len(rt)})
    if words == 0:
        raise SalmonnError(f"WER is undefined: none of the {len(refs)} references has a word after Whisper's "
                           f"normaliser (e.g. {refs[0]!r}; it drops fillers such as 'uh', 'um' and punctuation), "
                           f"so there is nothing to divide the {errors} inserted words by")
    wer = errors / words
    return {"wer": wer, "wer_percent": float(f"{wer * 100:.4f}"), "errors": errors, "ref_words": words,
            "empty_references": empty, "items": items}


# ---------------------------------------------------------------- CIDEr-D (challenge variant)

def _ngrams(tokens: list[str], n: int = 4) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i:i + k])] += 1
    return counts


def _vec(counts: Counter, df: dict, log_n_refs: float, n: int = 4):
    vec = [defaultdict(float) for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        d = math.log(max(1.0, df[gram]))
        k = len(gram) - 1
        vec[k][gram] = float(tf) * (log_n_refs - d)
        norm[k] += vec[k][gram] ** 2
        if k == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def _sim(cv, rv, cn, rn, cl, rl, n: int, sigma: float) -> list[float]:
    delta = float(cl - rl)
    val = [0.0] * n
    for k in range(n):
        for gram in cv[k]:
            val[k] += min(cv[k][gram], rv[k][gram]) * rv[k][gram]
        if cn[k] != 0 and rn[k] != 0:
            val[k] /= cn[k] * rn[k]
        val[k] *= math.e ** (-(delta**2) / (2 * sigma**2))
    return val


def cider_d(candidates: list[list[str]], references: list[list[list[str]]], n: int = 4, sigma: float = 6.0,
            scale: float = 10.0) -> tuple[float, list[float]]:
    """CIDEr-D over tokenised candidates and reference sets (aac-metrics' algorithm)."""
    if len(candidates) < 2:
        raise SalmonnError("CIDEr-D needs at least 2 candidates (document frequencies are corpus statistics)")
    cand_counts = [_ngrams(c, n) for c in candidates]
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    df: dict = defaultdict(float)
    for refs in ref_counts:
        for gram in {g for r in refs for g in r}:
            df[gram] += 1
    log_n_refs = math.log(float(len(ref_counts)))
    scores = []
    for cc, refs in zip(cand_counts, ref_counts):
        cv, cn, cl = _vec(cc, df, log_n_refs, n)
        total = [0.0] * n
        for rc in refs:
            rv, rn, rl = _vec(rc, df, log_n_refs, n)
            total = [a + b for a, b in zip(total, _sim(cv, rv, cn, rn, cl, rl, n, sigma))]
        scores.append(sum(total) / n / len(refs) * scale)
    return sum(scores) / len(scores), scores


def compute_spider(hyps: list[str], refs: list[str]) -> dict:
    """The challenge's "SPIDEr" = CIDEr-D × 100 (hyps lowercased, refs raw, split on whitespace)."""
    if len(hyps) != len(refs):
        raise SalmonnError(f"{len(hyps)} hypotheses for {len(refs)} references")
    corpus, items = cider_d([h.lower().split() for h in hyps], [[r.split()] for r in refs])
    return {"spider": float(f"{corpus * 100:.4f}"), "cider_d": corpus,
            "empty_references": sum(1 for r in refs if not r.split()), "items": items}


def standard_cider_d(hyps: list[str], refs: list[str]) -> dict | None:
    """pycocoevalcap's CIDEr-D (PTB-style lowercase tokens on both sides) where that package exists."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return None
    gts = {i: [r.lower()] for i, r in enumerate(refs)}
    res = {i: [h.lower()] for i, h in enumerate(hyps)}
    score, _ = Cider().compute_score(gts, res)
    return {"cider_d_pycocoevalcap": float(score)}
