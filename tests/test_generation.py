"""Generation: deterministic, batched equals unbatched, end symbol and lowercasing as the spec says."""

import numpy as np
import torch

from salmonn_export.audio import load_audio


def test_deterministic_and_audio_dependent(tiny_model, audio_dir):
    paths = [audio_dir / "speech_a.wav", audio_dir / "tone_2s.wav"]
    first = tiny_model.transcribe(paths, "asr")
    second = tiny_model.transcribe(paths, "asr")
    assert first == second
    assert first[0] != first[1]


def test_batched_equals_unbatched_for_equal_lengths(tiny_model, audio_dir):
    paths = [audio_dir / "tone_2s.wav", audio_dir / "chirp_2s.wav"]
    assert len(load_audio(paths[0])) == len(load_audio(paths[1]))
    one_by_one = [tiny_model.transcribe([p], "aac")[0] for p in paths]
    assert tiny_model.transcribe(paths, "aac", batch_size=2) == one_by_one
    greedy = [tiny_model.transcribe([p], "asr", num_beams=1)[0] for p in paths]
    assert tiny_model.transcribe(paths, "asr", batch_size=2, num_beams=1) == greedy


def test_decode_keeps_specials_splits_on_end_sym_lowercases_without_strip(tiny_model):
    tok = tiny_model.llama_tokenizer
    ids = tok(" Hello World", add_special_tokens=False).input_ids
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    eos = tok.convert_tokens_to_ids("<|end_of_text|>")
    n = len(ids)
    out = tiny_model.decode(torch.tensor([ids + [eot] + [eos] + ids, ids + [eos] * (n + 2)]))
    assert out == [" hello world<|eot_id|>", " hello world"]


def test_generation_stops_at_eos_list_and_pads_with_eos(tiny_model):
    wave = np.random.default_rng(1).standard_normal(16000) * 0.1
    batch = tiny_model.make_batch([wave], ["asr"])
    speech = tiny_model.encode_speech(batch)
    embeds, atts = tiny_model.prompt_wrap(speech, tiny_model.prompts_for(["asr"]))
    ids = tiny_model.generate_ids(embeds, atts, max_new_tokens=5)
    assert ids.shape[1] <= 5
    kwargs = tiny_model.generation_kwargs()
    assert kwargs["pad_token_id"] == tiny_model.causal_lm.config.eos_token_id
    assert kwargs["num_beams"] == 4 and kwargs["max_new_tokens"] == tiny_model.config.generate.max_new_tokens
