"""Shared fixtures: tiny real-format SALMONNs, synthesized audio, the challenge-made fixture."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from salmonn_export.model.synth import espeak_available, sound_scene, speak
from salmonn_export.model.tiny import write_tiny_salmonn

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHALLENGE_FIXTURE = FIXTURES / "challenge-made-tiny"
CHALLENGE_TIED_FIXTURE = FIXTURES / "challenge-made-tiny-tied"


@pytest.fixture(scope="session")
def challenge_fixture() -> Path:
    """Tiny SALMONN written by the challenge's own code, untied LLM head (see its README)."""
    return CHALLENGE_FIXTURE


@pytest.fixture(scope="session")
def challenge_tied_fixture() -> Path:
    """Same, seed 3, tied LLM embeddings: its checkpoint holds lm_head.weight (see its README)."""
    return CHALLENGE_TIED_FIXTURE


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_salmonn(tmp_path_factory.mktemp("tiny") / "salmonn", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from salmonn_export.model.salmonn import load_salmonn

    return load_salmonn(tiny_dir / "config.yaml")


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    """Speech from espeak-ng (22.05 kHz rendered → 16 kHz) and generated scenes, several formats."""
    folder = tmp_path_factory.mktemp("audio")
    if espeak_available():
        speak("the quick brown fox jumps over the lazy dog", folder / "speech_a.wav", voice="en-us")
        speak("please write down what you hear", folder / "speech_b.wav", voice="en-gb", speed=140)
    else:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); .ci/run installs it")
    sf.write(folder / "tone_2s.wav", sound_scene("tone", 2.0), 16000)
    sf.write(folder / "chirp_2s.wav", sound_scene("chirp", 2.0), 16000)
    stereo = np.stack([sound_scene("beeps", 1.5, 22050), sound_scene("noise", 1.5, 22050, seed=3)], axis=1)
    sf.write(folder / "stereo_22k.wav", stereo, 22050)
    sf.write(folder / "short_0.4s.wav", sound_scene("chirp", 0.4), 16000)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    return folder


@pytest.fixture(scope="session")
def calib_audio_dir(audio_dir, tmp_path_factory) -> Path:
    """The readable clips of `audio_dir` (all but broken.wav): a calibration folder for builds."""
    folder = tmp_path_factory.mktemp("calib_audio")
    for f in audio_dir.glob("*.wav"):
        if f.name != "broken.wav":
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["SALMONN_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
