"""Audio loading follows the evaluator: channel 0, ≥1 s pad at native rate, soxr-HQ 16 kHz, ≤30 s."""

import numpy as np
import pytest
import soundfile as sf

from salmonn_export.audio import MAX_SAMPLES, load_audio, load_clip, resample
from salmonn_export.errors import SalmonnError


def test_resample_equals_librosa_default():
    librosa = pytest.importorskip("librosa")
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(22050 * 2 + 17)
    for sr in (22050, 44100, 8000, 48000):
        ours = resample(wave, sr)
        theirs = librosa.resample(wave, orig_sr=sr, target_sr=16000)
        assert ours.dtype == theirs.dtype == np.float64
        np.testing.assert_array_equal(ours, theirs)


def test_stereo_takes_first_channel_and_short_clip_pads_at_native_rate(audio_dir):
    raw, sr = sf.read(audio_dir / "stereo_22k.wav", dtype="float64")
    wave = load_audio(audio_dir / "stereo_22k.wav")
    np.testing.assert_array_equal(wave, resample(raw[:, 0], sr))
    short = load_audio(audio_dir / "short_0.4s.wav")
    assert len(short) == 16000 and np.all(short[int(0.4 * 16000):] == 0)


def test_truncates_to_30_seconds(tmp_path):
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 31), 16000)
    assert len(load_audio(tmp_path / "long.wav")) == MAX_SAMPLES


def test_unreadable_and_missing_audio_name_the_file(audio_dir, tmp_path):
    with pytest.raises(SalmonnError, match="broken.wav: unreadable audio"):
        load_audio(audio_dir / "broken.wav")
    with pytest.raises(SalmonnError, match="nothere.wav: audio file not found"):
        load_audio(tmp_path / "nothere.wav")


@pytest.mark.parametrize("name,message", [
    ("clips", "is a folder, not an audio file"),  # a folder named where a clip belongs
    ("clips/.", "is a folder, not an audio file"),  # an annotation path `.`
    ("nothere.wav", "audio file not found"),
    ("clips/nothere.wav", "audio file not found"),
])
def test_a_folder_is_not_called_missing(tmp_path, name, message):
    (tmp_path / "clips").mkdir()
    with pytest.raises(SalmonnError) as info:
        load_clip(tmp_path / name)
    assert info.value.problem == message and info.value.path == str(tmp_path / name)
