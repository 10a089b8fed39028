"""The challenge's WER (`metrics.py`, spec section 5) transcribed from its sources, for differential tests.

- Normaliser: `whisper_english.py` beside this file (a verbatim copy of OpenAI's).
- Tokeniser: sacrebleu 1.5.1's `13a` (the challenge pins 1.5.1; we run sacrebleu 2.x), transcribed
  from `sacrebleu/tokenizers/tokenizer_13a.py` and `tokenizer_re.py` of the 1.5.1 wheel
  (Apache-2.0): language-independent replacements, the four regexes, `\\s+` → " ", strip.
- Then: drop tokens made entirely of Unicode-P punctuation, lowercase, `.split()`; corpus
  Σ editdistance / Σ reference words (spec 5, steps 2-3).
"""

import re
import unicodedata

import editdistance
from whisper_english import EnglishTextNormalizer

_RULES_13A = [
    (re.compile(r'([\{-\~\[-\` -\&\(-\+\:-\@\/])'), r' \1 '),
    (re.compile(r'([^0-9])([\.,])'), r'\1 \2 '),
    (re.compile(r'([\.,])([^0-9])'), r' \1 \2'),
    (re.compile(r'([0-9])(-)'), r'\1 \2 '),
    (re.compile(r'\s+'), r' '),
]

_NORMALIZER = EnglishTextNormalizer()


def tokenize_13a_v151(line: str) -> str:
    line = line.replace('<skipped>', '')
    line = line.replace('-\n', '')
    line = line.replace('\n', ' ')
    line = line.replace('&quot;', '"')
    line = line.replace('&amp;', '&')
    line = line.replace('&lt;', '<')
    line = line.replace('&gt;', '>')
    line = f" {line} "
    for pattern, replacement in _RULES_13A:
        line = pattern.sub(replacement, line)
    return line.strip()


def normalize(text: str) -> str:
    return _NORMALIZER(text)


def tokens(text: str) -> list[str]:
    tokenized = tokenize_13a_v151(_NORMALIZER(text))
    kept = [t for t in tokenized.split(" ") if not all(unicodedata.category(c).startswith("P") for c in t)]
    return " ".join(kept).lower().split()


def compute_wer(hyps: list[str], refs: list[str]) -> float:
    """Raises ZeroDivisionError when no reference has a word, as the challenge's code does."""
    errors = words = 0
    for h, r in zip(hyps, refs):
        rt, ht = tokens(r), tokens(h)
        errors += editdistance.eval(rt, ht)
        words += len(rt)
    return errors / words
