"""Audio front ends in numpy, with the reference's numbers.

- Whisper log-mel: what `WhisperFeatureExtractor` computes (float32 input padded to 30 s,
  centred reflect-padded STFT with a periodic Hann window, power, Slaney mel filters from the
  bundle, log10 with 1e-10 floor, max−8 floor, (x+4)/4, last frame dropped).
- BEATs: Kaldi fbank (povey window, preemphasis 0.97, DC removal, 512-point FFT, float32 mel
  banks) in float64 on wave·2^15, normalised, and the padding masks downsampled the way BEATs
  does (reshape-and-`all`, twice).
"""

from __future__ import annotations

import numpy as np


def whisper_log_mel(wave: np.ndarray, mel_filters: np.ndarray, n_fft: int = 400, hop: int = 160,
                    n_samples: int = 480000) -> np.ndarray:
    """[n_mels, 3000] float32 log-mel of one 16 kHz clip."""
    x = np.asarray(wave, dtype=np.float32)[:n_samples]
    x = np.pad(x, (0, n_samples - len(x)))
    x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")
    frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    spec = np.fft.rfft(x[idx] * window, axis=-1)
    power = (np.abs(spec) ** 2).astype(np.float32).T[:, :-1]
    mel = mel_filters.astype(np.float32).T @ power
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def kaldi_fbank(wave: np.ndarray, banks: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Kaldi fbank of one wave (already ×2^15), float64 [frames, mel bins].

    `banks` [bins, 257] and the povey `window` [400] come from the bundle, computed by the
    torch reference at build time (libm's float32 log differs between numpy and torch).
    """
    window_size, shift, padded = 400, 160, 512
    num_mel_bins = banks.shape[0]
    wave = np.asarray(wave, dtype=np.float64)
    if len(wave) < window_size:
        return np.zeros((0, num_mel_bins))
    frames = 1 + (len(wave) - window_size) // shift
    idx = np.arange(window_size)[None, :] + shift * np.arange(frames)[:, None]
    x = wave[idx]
    x = x - x.mean(axis=1, keepdims=True)
    prev = np.concatenate([x[:, :1], x[:, :-1]], axis=1)
    x = x - 0.97 * prev
    x = x * window.astype(np.float64)
    x = np.pad(x, ((0, 0), (0, padded - window_size)))
    power = np.abs(np.fft.rfft(x, axis=-1)) ** 2
    energies = power @ banks.astype(np.float64).T
    return np.log(np.maximum(energies, float(np.finfo(np.float32).eps)))


def beats_inputs(waves: list[np.ndarray], banks: np.ndarray, window: np.ndarray, patch: int = 16,
                 mean: float = 15.41663, std: float = 6.55582, scale: float = 2**15) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad the batch like the challenge's collate, fbank each row, and the token padding mask."""
    longest = max(len(w) for w in waves)
    raw = np.zeros((len(waves), longest), dtype=np.float64)
    sample_mask = np.ones((len(waves), longest), dtype=bool)
    for i, w in enumerate(waves):
        raw[i, : len(w)] = w
        sample_mask[i, : len(w)] = False
    fbank = np.stack([kaldi_fbank(row * scale, banks, window) for row in raw])
    fbank = ((fbank - mean) / (2 * std)).astype(np.float32)
    frames = fbank.shape[1]
    tokens = (frames // patch) * (128 // patch)
    frame_mask = downsample_mask(sample_mask, frames)
    return fbank, downsample_mask(frame_mask, tokens)


def downsample_mask(mask: np.ndarray, length: int) -> np.ndarray:
    """BEATs `forward_padding_mask`: drop the remainder, reshape to [B, length, -1], all()."""
    extra = mask.shape[1] % length
    if extra > 0:
        mask = mask[:, :-extra]
    return mask.reshape(mask.shape[0], length, -1).all(-1)
