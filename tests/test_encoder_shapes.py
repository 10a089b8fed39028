"""Shapes and counts of BEATs and the windowed Q-Former for 1 s, 10 s and 30 s (spec 2.3-2.7)."""

import numpy as np
import pytest
import torch

from salmonn_export.model.qformer import num_windows, qformer_windows, window_size


@pytest.mark.parametrize("seconds,beats_tokens", [(1, 48), (10, 496), (30, 1496)])
def test_counts_match_the_spec_formula(tiny_model, seconds, beats_tokens):
    n = 16000 * seconds
    wave = np.random.default_rng(seconds).standard_normal(n) * 0.1
    batch = tiny_model.make_batch([wave], ["asr"])
    assert tuple(batch.spectrogram.shape) == (1, 80, 3000)
    with torch.inference_mode():
        whisper = tiny_model.encode_whisper(batch.spectrogram)
        beats = tiny_model.encode_beats(batch.raw_wav, batch.padding_mask)
        t_f = 1 + (n - 400) // 160
        assert beats.shape[1] == 8 * (t_f // 16) == beats_tokens
        fused = tiny_model.fuse(whisper, beats)
        assert tuple(fused.shape) == (1, 1500, 64 + 64)
        assert torch.all(fused[0, beats_tokens:, 64:] == 0)  # zero pad after ln_audio
        speech = tiny_model.qformer_project(fused)
    k = window_size(0.333333)
    assert k == 17 and num_windows(1500, k, k) == 88
    assert tuple(speech.shape) == (1, 88, 64)


def test_unfold_windowing_equals_reshape_of_first_1496_frames():
    x = torch.randn(3, 1500, 10)
    windows = qformer_windows(x, 17, 17)
    assert tuple(windows.shape) == (3 * 88, 17, 10)
    assert torch.equal(windows, x[:, :1496].reshape(3, 88, 17, 10).reshape(-1, 17, 10))
