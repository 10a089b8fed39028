"""The demo training's copy drills (benchmarks/demo_model/lm.py, issue 17): a random-token drill is
the ASR prompt with the body where the speech goes, then the same body as the answer, and its
answer start marks exactly where that copy begins (the loss is on the answer only)."""

import importlib
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

DEMO_TRAINING = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_model"


@pytest.fixture()
def lm(monkeypatch):
    monkeypatch.syspath_prepend(str(DEMO_TRAINING))
    return importlib.import_module("lm")


@pytest.fixture()
def tokenizer(lm):
    words = "USER: ASSISTANT: Recognize the speech and give me the transcription . \n <Speech> </Speech>".split(" ")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[UNK]", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([lm.END])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_drill_answer_is_the_body(lm, tokenizer, seed):
    end = tokenizer.convert_tokens_to_ids(lm.END)
    drills = lm._random_drills(tokenizer, 25, seed)
    assert len(drills) == 25
    for ids, answer_start in drills:
        answer = ids[answer_start:]
        assert answer[-1] == end
        body = answer[:-1]
        assert 4 <= len(body) <= 20
        assert all(300 <= t < lm.BPE_VOCAB - 300 for t in body)
        prompt = ids[:answer_start]
        assert any(prompt[i:i + len(body)] == body for i in range(len(prompt) - len(body) + 1))
        assert prompt[-1] == tokenizer.convert_tokens_to_ids("ASSISTANT:")  # the answer follows the prompt's end


def test_random_drills_are_deterministic_per_seed(lm, tokenizer):
    assert lm._random_drills(tokenizer, 10, 3) == lm._random_drills(tokenizer, 10, 3)
    assert lm._random_drills(tokenizer, 10, 3) != lm._random_drills(tokenizer, 10, 4)
