"""The natural-voice training data of the demo model (benchmarks/demo_model/natural_data.py, issue 17):
sentence filtering, disjoint held-out splits, voice hold-out and 30-s packing. Pure functions
only: no voice engine or corpus package is needed here."""

import importlib
from pathlib import Path

import numpy as np
import pytest

DEMO_TRAINING = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_model"


@pytest.fixture()
def nd(monkeypatch):
    monkeypatch.syspath_prepend(str(DEMO_TRAINING))
    return importlib.import_module("natural_data")


def test_wordnet_examples_are_the_quoted_usage_examples(nd):
    lines = ["  1 This software and database is being provided ...",
             '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which exists; "the cat is on the mat"; '
             '"an entity of its own"',
             "00002137 03 n 02 abstraction 0 000 | a general concept"]
    assert nd.wordnet_examples(lines) == ["the cat is on the mat", "an entity of its own"]


def test_filter_keeps_plain_known_sentences_normalised_unique_sorted(nd):
    known = {"the", "cat", "sat", "on", "mat", "dog", "it's", "a", "well", "known", "fact", "is", "here"}
    raw = ["The cat sat on the mat.", "the cat sat on the mat", "It's a well-known fact, the dog is here!",
           "The cat sat on 3 mats.", "The cat sat.", "The zebra sat on the mat.", "the <cat> sat on the mat",
           " ".join(["the cat"] * 9)]
    assert nd.filter_sentences(raw, known) == ["it's a well known fact the dog is here", "the cat sat on the mat"]


def test_held_out_splits_are_disjoint_and_seeded(nd):
    sentences = [f"sentence number {i} here" for i in range(50)]
    a = nd.split_sentences(sentences, 5, 7, {sentences[0]}, seed=3)
    assert [len(a[k]) for k in ("heldout_sentences", "heldout_voices", "train")] == [5, 7, 37]
    assert sentences[0] not in {s for v in a.values() for s in v}
    assert not set(a["train"]) & (set(a["heldout_sentences"]) | set(a["heldout_voices"]))
    assert not set(a["heldout_sentences"]) & set(a["heldout_voices"])
    assert a == nd.split_sentences(sentences, 5, 7, {sentences[0]}, seed=3)
    assert a != nd.split_sentences(sentences, 5, 7, {sentences[0]}, seed=4)


def test_held_out_voices_never_train_and_packed_plans_use_training_voices(nd):
    import voices

    assert set(voices.HELDOUT_VOICES).isdisjoint(voices.TRAIN_VOICES)
    assert set(voices.HELDOUT_VOICES) | set(voices.TRAIN_VOICES) == set(voices.ALL_VOICES)
    train = ["one two three four", "five six seven eight nine"]
    plan = nd.plan_packed(np.random.default_rng(0), train, ["one", "five"])
    assert plan == nd.plan_packed(np.random.default_rng(0), train, ["one", "five"])
    assert {seg["voice"] for seg in plan} <= set(voices.TRAIN_VOICES)
    assert all(nd.TEMPO[0] <= seg["tempo"] <= nd.TEMPO[1] and 0.15 <= seg["gap"] <= 0.5 for seg in plan)
    estimated = sum(len(seg["text"].split()) / 2.6 / seg["tempo"] + seg["gap"] for seg in plan)
    assert estimated >= nd.PACKED_SECONDS  # enough drawn to fill the window; fit_pieces cuts the rest


def test_fit_pieces_keeps_what_fits_and_at_least_one(nd):
    assert nd.fit_pieces([10, 10, 10], [0, 2, 2], limit=22) == 2  # 10, +2+10 = 22, +2+10 > 22
    assert nd.fit_pieces([10, 10], [0, 5], limit=25) == 2
    assert nd.fit_pieces([30, 5], [0, 1], limit=20) == 1  # the first piece always stays (cut later)


def test_held_out_sentences_come_from_the_held_out_pool_only(nd):
    sentences = [f"sentence number {i} here" for i in range(50)]
    pool = sentences[40:]
    a = nd.split_sentences(sentences, 3, 4, set(), seed=0, heldout_pool=pool)
    assert set(a["heldout_sentences"]) | set(a["heldout_voices"]) <= set(pool)
    assert len(a["train"]) == 43 and not set(a["train"]) & (set(a["heldout_sentences"]) | set(a["heldout_voices"]))
