"""WER normalisation equals the challenge's: transformers' Whisper normaliser + OpenAI's spelling map vs a
verbatim copy of OpenAI's code (tests/challenge_reference), over a generated corpus of a few thousand texts."""

import hashlib
import itertools
import random
import sys
from pathlib import Path

import pytest

from salmonn_export.errors import SalmonnError
from salmonn_export.harness.metrics import SPELLING_MAP, compute_spider, compute_wer, normalize_english, wer_tokens

sys.path.insert(0, str(Path(__file__).resolve().parent / "challenge_reference"))
import challenge_metrics  # noqa: E402

# OpenAI whisper, whisper/normalizers/english.json at c0d2f624 (unchanged since ea1c266, Jan 2023)
OPENAI_SPELLING_MAP_SHA256 = "6607f948be9824d2e1b2fa2223cd94c06c45afa4e05ea0e3d5e1f2bdffde2465"

PIECES = {
    "contractions": ["I'm", "you're", "he's", "she'd", "we'll", "they've", "can't", "won't", "ain't", "let's",
                     "y'all", "i'ma", "it's been", "he'd gone", "she's got", "ma'am", "don't", "isn't", "o'clock",
                     "rock 'n' roll", "it 's", "we 're", "that'd done"],
    "slang": ["kinda", "sorta", "dunno", "cause", "'cause", "gonna", "wanna", "gotta", "imma", "woulda", "coulda",
              "shoulda", "lemme", "gimme", "outta", "ya know", "innit", "cuz"],
    "numbers": ["one", "two hundred and five", "twenty-one", "twenty one", "nineteen ninety nine", "1999", "3rd",
                "twenty first", "first", "second", "a hundred", "one thousand two hundred", "1,234,567", "3.14",
                "two point five", "point five", "double seven", "triple zero", "oh seven", "zero", "ones",
                "sixes", "twenties", "millionth", "two and a half", "one and a half million", "minus five",
                "plus three", "five hundred thousand", "10th", "192.168.0.1", "1 2 3", "7 eleven", "nine 11",
                "twenty-five thousand and six", "a million and one", "eleventh hour", "fifty fifty"],
    "currency": ["$5", "$5.50", "five dollars", "five dollars and ten cents", "ten cents", "£3.50", "three pounds",
                 "€20", "twenty euros", "¢7", "$2 and ¢7", "$0.99", "one dollar", "a dollar", "$ 5", "5$",
                 "cents", "dollars"],
    "percent": ["50%", "fifty percent", "fifty per cent", "5 %", "%", "99.9 percent"],
    "british": ["colour", "theatre", "organise", "organised", "grey", "centre", "travelling", "analyse", "cheque",
                "programme", "aluminium", "defence", "licence", "mum", "favourite", "honour", "neighbours",
                "catalogue", "realise", "apologise"],
    "titles": ["Mr. Smith", "Mrs Jones", "Dr. Who", "St. Louis", "Prof. X", "Capt. Hook", "Gen. Lee", "Jr.",
               "Sr.", "Lt. Dan", "Rev. King", "Esq.", "mr smith", "Hon. member"],
    "fillers": ["uh", "um", "hmm", "mm", "mhm", "mmm", "uh-huh", "umm", "er", "ah", "UH", "Um,"],
    "brackets": ["[laughter]", "(inaudible)", "<unk>", "[noise] hello", "(a) b", "<b>bold</b>", "[", ")", "(("],
    "hyphens": ["well-known", "co-operate", "e-mail", "-", "--", "—", "–", "x-ray", "twenty-twenty", "re-enter",
                "mother-in-law", "3-4", "-5", "5-"],
    "unicode": ["café", "naïve", "Straße", "œuvre", "Ærø", "Łódź", "þorn", "ðe", "façade", "résumé", "ｆｕｌｌ",
                "１２３", "½", "²", "℃", "™", "“quoted”", "‘single’", "it’s", "don’t", "…", "¿qué?", "日本語",
                "😀", "e\u0301", "ﬁne", "Ⅻ", "\u00a0", "\u200b", "\t", "\n", "a\u2028b"],
    "punctuation": [".", ",", "!", "?", ";", ":", "...", "'", '"', "&amp;", "&quot;", "<skipped>", "/", "\\", "@",
                    "#1", "a.b", "U.S.A.", "e.g.", "i.e.", "etc.", "3.", ".5", "5.", "1,000", "1, 000"],
    "words": ["the", "cat", "sat", "on", "THE", "Mat", "hello", "world", "and", "a", "half", "point", "double",
              "triple", "and a half", "o", "oh", "nil", "none", "nan", "null", "NaN", "N/A"],
}


def corpus(n_random: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    every = [p for group in PIECES.values() for p in group]
    texts = list(every)
    texts += [f"{a} {b}" for a, b in itertools.product(PIECES["numbers"], ["dollars", "percent", "cents", "th", "and"])]
    texts += [f"I'm {b} {n}" for b, n in zip(PIECES["british"], itertools.cycle(PIECES["numbers"]))]
    for _ in range(n_random):
        k = rng.randint(1, 9)
        parts = [rng.choice(every) for _ in range(k)]
        seps = [rng.choice([" ", " ", " ", "", ", ", ". ", "-", "  ", "'"]) for _ in range(k)]
        text = "".join(p + s for p, s in zip(parts, seps))
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        texts.append(text)
    return texts


def test_spelling_map_is_openais():
    assert hashlib.sha256(SPELLING_MAP.read_bytes()).hexdigest() == OPENAI_SPELLING_MAP_SHA256


def test_issue_examples_score_as_the_challenge_does():
    # whisper-normalizer maps kinda → "kind of" (0 % WER); the challenge's copy does not
    assert wer_tokens("i kinda like it") == ["i", "kinda", "like", "it"]
    assert compute_wer(["i kinda like it"], ["i kind of like it"])["wer_percent"] == 40.0
    for slang, expansion in [("sorta", "sort of"), ("dunno", "do not know"), ("cause", "because")]:
        assert compute_wer([f"i {slang}"], [f"i {expansion}"])["wer"] > 0


def test_normaliser_equals_openais_on_a_generated_corpus():
    texts = corpus()
    assert len(texts) > 3000
    mismatches = [(t, normalize_english(t), challenge_metrics.normalize(t)) for t in texts
                  if normalize_english(t) != challenge_metrics.normalize(t)]
    assert not mismatches, mismatches[:5]
    token_mismatches = [t for t in texts if wer_tokens(t) != challenge_metrics.tokens(t)]
    assert not token_mismatches, token_mismatches[:5]
    # the corpus exercises the rules: many texts change, numbers and spellings among them
    changed = sum(normalize_english(t) != t.lower() for t in texts)
    assert changed > len(texts) // 2
    assert normalize_english("twenty five dollars") == "$25" and normalize_english("colour") == "color"


def test_corpus_wer_equals_the_challenges():
    texts = corpus(n_random=600, seed=1)
    rng = random.Random(2)
    refs = [t for t in texts if challenge_metrics.tokens(t)]
    hyps = [rng.choice(texts) if rng.random() < 0.5 else r for r in refs]
    ours = compute_wer(hyps, refs)
    assert ours["wer"] == challenge_metrics.compute_wer(hyps, refs)
    assert 0 < ours["wer"] < 1.5


@pytest.mark.parametrize("reference", ["", " ", "uh", "um, uh", "Hmm... mm!", "...", "?!", "[noise]", "(laughs)",
                                       "<unk>", "\u00a0", "—"])
def test_wer_over_references_without_words_is_an_error(reference):
    hypothesis = "one two three four five six seven eight words"
    assert challenge_metrics.tokens(reference) == []
    with pytest.raises(ZeroDivisionError):  # the challenge crashes here
        challenge_metrics.compute_wer([hypothesis], [reference])
    with pytest.raises(SalmonnError, match="WER is undefined: none of the 1 references has a word"):
        compute_wer([hypothesis], [reference])
    with pytest.raises(SalmonnError, match="none of the 2 references"):
        compute_wer([hypothesis, ""], [reference, "uh"])


def test_one_empty_reference_among_others_counts_insertions():
    result = compute_wer(["a b c", "x y z w"], ["a b c", "uh"])
    assert (result["errors"], result["ref_words"], result["empty_references"]) == (4, 3, 1)
    assert result["wer"] == challenge_metrics.compute_wer(["a b c", "x y z w"], ["a b c", "uh"]) == 4 / 3


@pytest.mark.parametrize("reference", ["", " ", "\t\n"])
def test_captioning_over_empty_references_is_never_a_perfect_score(reference):
    refs = ["a dog barks loudly", reference]
    for hyps in (["a dog barks loudly", ""], ["a dog barks loudly", "a dog barks loudly"]):
        result = compute_spider(hyps, refs)
        assert result["items"][1] == 0.0 and result["empty_references"] == 1
    every_empty = compute_spider(["a dog", ""], [reference, reference])
    assert every_empty["spider"] == 0.0 and every_empty["empty_references"] == 2
