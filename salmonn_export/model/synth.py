"""Local audio synthesis: speech with flite or espeak-ng, sound scenes with numpy. No downloads."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from salmonn_export.errors import SalmonnError

FLITE_PREFIX = "flite:"  # `flite:rms` speaks with flite's built-in voice rms; any other name is an espeak-ng voice
DEFAULT_SPEED = 160  # words per minute, espeak-ng's unit; flite's duration stretch is 160 / speed


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def flite_available() -> bool:
    return shutil.which("flite") is not None


@functools.cache
def flite_voices() -> tuple[str, ...]:
    """flite's built-in voices (`flite -lv`), asked once per process (speak checks every voice name)."""
    listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout
    return tuple(listed.split(":", 1)[-1].split())


def speak(text: str, out: str | Path, voice: str = "en-us", speed: int = DEFAULT_SPEED, sample_rate: int = 16000,
          pitch: int = 50) -> Path:
    """Speak `text` into a 16-bit mono WAV at `sample_rate` Hz, resampled with soxr from the engine's rate.

    `voice`: `flite:<name>` for flite's built-in voices (rms, slt, awb, kal16, kal: natural enough that
    Whisper tiny.en reads them at 9-13 % WER, issue 17), else an espeak-ng voice (en-us, en-gb, ...;
    robotic, 24-34 %). `speed` in words per minute; `pitch` (0-99) is espeak-ng's only.
    Raises SalmonnError when the engine is not installed or fails."""
    flite_voice = voice[len(FLITE_PREFIX):] if voice.startswith(FLITE_PREFIX) else None
    if flite_voice is not None and not flite_available():
        raise SalmonnError("flite is needed to synthesize speech with its voices; install it (apt-get install flite)")
    if flite_voice is None and not espeak_available():
        raise SalmonnError("espeak-ng is needed to synthesize speech; install it (apt-get install espeak-ng)")
    if flite_voice is not None and flite_voice not in flite_voices():  # flite falls back to kal silently
        raise SalmonnError(f"flite has no voice `{flite_voice}` (installed: {', '.join(flite_voices())})")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        if flite_voice is not None:
            cmd = ["flite", "-voice", flite_voice, "--setf", f"duration_stretch={DEFAULT_SPEED / speed:.4f}",
                   "-t", text, "-o", str(raw)]
        else:
            cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not raw.is_file():
            raise SalmonnError(f"{cmd[0]} failed for voice {voice}: {(proc.stderr or proc.stdout).strip()[:200]}")
        wave, sr = sf.read(str(raw), dtype="float64")
    if wave.ndim > 1:
        wave = wave.mean(axis=1)
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


# ---------------------------------------------------------------------------- captioned scenes
# Each event renders a wave of a given length and has one caption phrase. The first six are the
# demo test set's scenes; training (benchmarks/demo_model) draws single events and pairs of them.

def _tone(t, sr, rng):
    f = float(rng.choice([220.0, 440.0, 880.0]))
    pitch = "low" if f < 300 else "high" if f > 600 else "mid"
    return 0.4 * np.sin(2 * np.pi * f * t), f"a steady {pitch} pitched tone"


def _chirp_up(t, sr, rng):
    return 0.4 * np.sin(2 * np.pi * (200 * t + 900 * t**2 / max(t[-1], 1e-3))), "a tone rising quickly in pitch"


def _chirp_down(t, sr, rng):
    return 0.4 * np.sin(2 * np.pi * (2000 * t - 900 * t**2 / max(t[-1], 1e-3))), "a whistle falling in pitch"


def _noise_bursts(t, sr, rng):
    gate = (np.floor(t * 2) % 2 == 0).astype(float)
    return 0.3 * gate * rng.standard_normal(t.shape), "short bursts of loud static noise"


def _beeps(t, sr, rng):
    gate = (np.floor(t * 6) % 2 == 0).astype(float)
    return 0.4 * gate * np.sin(2 * np.pi * 1000 * t), "rapid electronic beeping in a steady rhythm"


def _hum(t, sr, rng):
    return 0.2 * np.sin(2 * np.pi * 60 * t) + 0.05 * rng.standard_normal(t.shape), "a low electrical hum with faint hiss"


def _siren(t, sr, rng):
    f = 700 + 250 * np.sin(2 * np.pi * 0.5 * t)
    return 0.35 * np.sin(2 * np.pi * np.cumsum(f) / sr), "a siren wailing up and down"


def _knocks(t, sr, rng):
    wave = np.zeros_like(t)
    period = float(rng.uniform(0.35, 0.6))
    for start in np.arange(0.1, t[-1], period):
        i = int(start * sr)
        n = min(int(0.08 * sr), len(t) - i)
        wave[i:i + n] += 0.6 * np.exp(-np.arange(n) / (0.01 * sr)) * np.sin(2 * np.pi * 150 * np.arange(n) / sr)
    return wave, "someone knocking on a wooden door"


def _rain(t, sr, rng):
    wave = 0.08 * rng.standard_normal(t.shape)
    drops = rng.random(t.shape) < 60 / sr
    wave += 0.5 * np.convolve(drops * rng.standard_normal(t.shape), np.exp(-np.arange(80) / 10), mode="same")
    return wave, "rain falling steadily on a roof"


def _engine(t, sr, rng):
    f = float(rng.uniform(35, 55))
    wave = sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 6))
    return 0.2 * wave * (1 + 0.3 * np.sin(2 * np.pi * 8 * t)), "an engine rumbling at idle"


def _bell(t, sr, rng):
    wave = np.zeros_like(t)
    for start in np.arange(0.0, t[-1], 1.0):
        i = int(start * sr)
        s = np.arange(len(t) - i) / sr
        wave[i:] += np.exp(-3 * s) * sum(np.sin(2 * np.pi * 520 * r * s) / (k + 1)
                                         for k, r in enumerate((1.0, 2.76, 5.4)))
    return 0.3 * wave, "a bell ringing slowly"


def _wind(t, sr, rng):
    noise = np.convolve(rng.standard_normal(t.shape), np.ones(40) / 40, mode="same")
    return 2.5 * noise * (0.6 + 0.4 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6))), "wind blowing in gusts"


SCENE_EVENTS = {
    "tone": _tone, "chirp_up": _chirp_up, "chirp_down": _chirp_down, "noise_bursts": _noise_bursts,
    "beeps": _beeps, "hum_noise": _hum, "siren": _siren, "knocks": _knocks, "rain": _rain, "engine": _engine,
    "bell": _bell, "wind": _wind,
}


def scene_event(kind: str, seconds: float, sample_rate: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One captioned sound event (`SCENE_EVENTS`): the wave and its caption phrase (lowercase)."""
    if kind not in SCENE_EVENTS:
        raise SalmonnError(f"unknown sound scene `{kind}`; choose one of: {', '.join(SCENE_EVENTS)}")
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    wave, phrase = SCENE_EVENTS[kind](t, sample_rate, rng)
    return np.asarray(wave, dtype=np.float64), phrase


def captioned_scene(rng: np.random.Generator, sample_rate: int = 16000,
                    kinds: list[str] | None = None) -> tuple[np.ndarray, str]:
    """A random scene: one event, two in sequence ("a, then b") or two at once ("a over b")."""
    wave, caption = _compose(rng, sample_rate, kinds or list(SCENE_EVENTS))
    peak = float(np.abs(wave).max())
    return (wave * 0.9 / peak if peak > 0.9 else wave), caption


def _compose(rng: np.random.Generator, sample_rate: int, kinds: list[str]) -> tuple[np.ndarray, str]:
    mode = rng.choice(["single", "sequence", "overlap"], p=[0.4, 0.3, 0.3])
    first = str(rng.choice(kinds))
    if mode == "single":
        wave, phrase = scene_event(first, float(rng.uniform(2.0, 6.0)), sample_rate, rng)
        return wave, phrase.capitalize()
    second = str(rng.choice([k for k in kinds if k != first]))
    if mode == "sequence":
        a, pa = scene_event(first, float(rng.uniform(1.5, 3.0)), sample_rate, rng)
        b, pb = scene_event(second, float(rng.uniform(1.5, 3.0)), sample_rate, rng)
        return np.concatenate([a, b]), f"{pa.capitalize()}, then {pb}"
    seconds = float(rng.uniform(2.5, 6.0))
    a, pa = scene_event(first, seconds, sample_rate, rng)
    b, pb = scene_event(second, seconds, sample_rate, rng)
    return 0.6 * a + 0.4 * b, f"{pa.capitalize()} over {pb}"
