"""Prompt wrap: BOS, the text around the 88 speech embeddings, [PAD] right-padding (spec 3)."""

import torch

from salmonn_export.model.prompts import builtin_test_prompts


def test_builtin_prompts_include_the_challenge_tasks():
    p = builtin_test_prompts()
    assert p["asr"] == "<Speech><SpeechHere></Speech> Recognize the speech and give me the transcription."
    assert p["audiocaption_v2"] == "<Speech><SpeechHere></Speech> Please write down what your hear in the audio."


def test_token_ids_around_speech(tiny_model):
    tok = tiny_model.llama_tokenizer
    speech = torch.randn(2, 88, 64)
    prompts = tiny_model.prompts_for(["asr", "aac"])
    assert prompts[0] == "USER: <Speech><SpeechHere></Speech> Recognize the speech and give me the transcription.\nASSISTANT:"
    embeds, atts = tiny_model.prompt_wrap(speech, prompts)

    def ids_of(text):
        return tok(text, add_special_tokens=False).input_ids

    before = ids_of("USER: <Speech>")
    after_asr = ids_of("</Speech> Recognize the speech and give me the transcription.\nASSISTANT:")
    after_aac = ids_of("</Speech> Please write down what your hear in the audio.\nASSISTANT:")
    longest = max(len(after_asr), len(after_aac))
    assert embeds.shape[1] == 1 + len(before) + 88 + longest
    emb = tiny_model.embed_tokens
    for i, after in enumerate((after_asr, after_aac)):
        padded = after + [tok.pad_token_id] * (longest - len(after))
        ids = [tok.bos_token_id] + before
        assert torch.equal(embeds[i, : len(ids)], emb(torch.tensor(ids)))
        assert torch.equal(embeds[i, len(ids): len(ids) + 88], speech[i])
        assert torch.equal(embeds[i, len(ids) + 88:], emb(torch.tensor(padded)))
        assert atts[i].tolist() == [1] * (len(ids) + 88 + len(after)) + [0] * (longest - len(after))
