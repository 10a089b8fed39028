"""Real Whisper tiny.en weights from the CTranslate2 package, converted to an HF folder, transcribe speech."""

import pytest
import torch

from salmonn_export.audio import load_audio
from salmonn_export.errors import SalmonnError
from salmonn_export.harness.metrics import compute_wer
from salmonn_export.model.ct2_whisper import convert_ct2_whisper, packaged_tiny_en, read_ct2
from salmonn_export.model.synth import espeak_available, speak

SENTENCES = [("the quick brown fox jumps over the lazy dog", "en-us"),
             ("please call stella and ask her to bring these things", "en-gb"),
             ("the weather today is sunny with a light breeze", "en-us")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    try:
        source = packaged_tiny_en()
    except SalmonnError as exc:
        pytest.skip(str(exc))
    return convert_ct2_whisper(source, tmp_path_factory.mktemp("w") / "whisper-tiny-en")


def test_converted_whisper_transcribes_espeak_speech(converted, tmp_path):
    if not espeak_available():
        pytest.skip("espeak-ng is not installed")
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    fe = WhisperFeatureExtractor.from_pretrained(converted)
    tok = Tokenizer.from_file(str(converted / "tokenizer.json"))
    assert tok.get_vocab_size() == 51864 and tok.token_to_id("<|30.00|>") == 51863
    hyps = []
    for i, (text, voice) in enumerate(SENTENCES):
        speak(text, tmp_path / f"{i}.wav", voice=voice)
        feats = fe(load_audio(tmp_path / f"{i}.wav"), sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(feats, num_beams=1, max_new_tokens=40)
        hyps.append(tok.decode(ids[0].tolist(), skip_special_tokens=True))
    wer = compute_wer(hyps, [s for s, _ in SENTENCES])["wer"]
    assert wer < 0.5, (wer, hyps)  # random weights give ~100%; espeak speech is robotic


def test_encoder_loads_into_the_salmonn_whisper_loader(converted):
    from salmonn_export.model.whisper import load_whisper_encoder

    encoder = load_whisper_encoder(converted)
    assert encoder.config.d_model == 384 and encoder.config.encoder_layers == 4


def test_bad_ct2_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00\x05\x00abc")
    with pytest.raises(SalmonnError, match="not a readable CTranslate2 model"):
        read_ct2(tmp_path / "model.bin")
