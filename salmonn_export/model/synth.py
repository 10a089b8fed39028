"""Local audio synthesis: speech with espeak-ng, sound scenes with numpy. No downloads."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from salmonn_export.errors import SalmonnError


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, out: str | Path, voice: str = "en-us", speed: int = 160, sample_rate: int = 16000) -> Path:
    """Speak `text` into a 16-bit WAV at `sample_rate` (espeak-ng renders 22.05 kHz; resampled with soxr)."""
    if not espeak_available():
        raise SalmonnError("espeak-ng is needed to synthesize speech; install it (apt-get install espeak-ng)")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not raw.is_file():
            raise SalmonnError(f"espeak-ng failed for voice {voice}: {proc.stderr.strip()[:200]}")
        wave, sr = sf.read(str(raw), dtype="float64")
    if sr != sample_rate:
        import soxr

        wave = soxr.resample(wave, sr, sample_rate, quality="soxr_hq")
    sf.write(str(out), wave, sample_rate, subtype="PCM_16")
    return out


def sound_scene(kind: str, seconds: float = 3.0, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A generated sound scene: `tone`, `chirp`, `noise`, `beeps` (rhythm)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    if kind == "tone":
        wave = 0.4 * np.sin(2 * np.pi * 440.0 * t)
    elif kind == "chirp":
        f0, f1 = 200.0, 2000.0
        wave = 0.4 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
    elif kind == "noise":
        wave = 0.2 * rng.standard_normal(t.shape)
    elif kind == "beeps":
        gate = (np.floor(t * 4) % 2 == 0).astype(np.float64)
        wave = 0.4 * gate * np.sin(2 * np.pi * 880.0 * t)
    else:
        raise SalmonnError(f"unknown sound scene `{kind}`")
    return wave.astype(np.float64)
