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


def _salmonn_unfold(fused, kernel, stride):
    """SALMONN's own windowing (models/salmonn.py): F.unfold over [B, C, 1, T]."""
    B, T, C = fused.shape
    unfolded = torch.nn.functional.unfold(fused.transpose(1, 2).unsqueeze(2), kernel_size=(1, kernel), dilation=1,
                                          padding=0, stride=(1, stride))
    L = unfolded.shape[-1]
    return unfolded.view(B, -1, kernel, L).permute(0, 3, 2, 1).reshape(-1, kernel, C)


@pytest.mark.parametrize("batch,frames,kernel,stride", [(3, 1500, 17, 17), (1, 1500, 6, 6), (2, 1500, 25, 25),
                                                        (2, 1500, 17, 8), (1, 1500, 16, 17), (2, 101, 7, 7)])
def test_windowing_equals_salmonn_unfold(batch, frames, kernel, stride):
    """The tiling fast path (stride == kernel: slice + reshape) and the general unfold path give
    SALMONN's unfold windows bit for bit, overlapping and gapped windows included."""
    x = torch.randn(batch, frames, 10)
    windows = qformer_windows(x, kernel, stride)
    assert tuple(windows.shape) == (batch * num_windows(frames, kernel, stride), kernel, 10)
    assert torch.equal(windows, _salmonn_unfold(x, kernel, stride))
