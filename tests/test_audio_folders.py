"""Audio folders (build --calib DIR, verify --data DIR): every container soundfile decodes is listed, and
files it cannot decode (.m4a, .wma, .webm ...) are named with a conversion, never silently skipped."""

import warnings

import numpy as np
import pytest
import soundfile as sf

from salmonn_export.audio import AUDIO_SUFFIXES, load_clip
from salmonn_export.dataset import audio_files
from salmonn_export.errors import SalmonnError, SalmonnWarning

# (extension, soundfile format, subtype): containers users bring that libsndfile writes too
READABLE = [(".opus", "OGG", "OPUS"), (".oga", "OGG", "VORBIS"), (".aifc", "AIFF", "PCM_16"), (".au", "AU", "PCM_16"),
            (".caf", "CAF", "PCM_16"), (".w64", "W64", "PCM_16"), (".rf64", "RF64", "PCM_16"), (".WAV", "WAV", "PCM_16")]


def _tone(path, fmt, subtype, rate=48000):
    t = np.arange(rate) / rate
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 440 * t), rate, format=fmt, subtype=subtype)


@pytest.mark.parametrize("suffix,fmt,subtype", READABLE)
def test_readable_containers_are_listed_and_load(tmp_path, suffix, fmt, subtype):
    path = tmp_path / "sub" / f"clip{suffix}"
    path.parent.mkdir()
    _tone(path, fmt, subtype)
    assert audio_files(tmp_path) == [path]
    clip = load_clip(path)
    assert clip.native_rate == 48000 and clip.wave.shape == (16000,) and np.isfinite(clip.wave).all()
    assert suffix.lower() in AUDIO_SUFFIXES


@pytest.mark.parametrize("suffix", [".m4a", ".wma", ".webm", ".M4A"])
def test_undecodable_containers_are_named_not_skipped(tmp_path, suffix):
    odd = tmp_path / f"voice{suffix}"
    odd.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))  # an MP4 header: soundfile cannot decode it
    with pytest.raises(SalmonnError, match=r"no readable audio files in this folder: 1 .* file\(s\) that soundfile") as e:
        audio_files(tmp_path)
    assert str(odd) in str(e.value) and "convert them to WAV or FLAC" in str(e.value)
    with pytest.raises(SalmonnError, match="cannot decode this container: convert it to WAV or FLAC") as e:
        load_clip(odd)
    assert str(odd) in str(e.value)
    _tone(tmp_path / "ok.wav", "WAV", "PCM_16")  # beside a readable file: one warning, the readable one kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert audio_files(tmp_path) == [tmp_path / "ok.wav"]
    notes = [str(w.message) for w in caught if issubclass(w.category, SalmonnWarning)]
    assert len(notes) == 1 and "skipping 1" in notes[0] and str(odd) in notes[0]


def test_folder_without_audio_names_what_is_read(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SalmonnError, match=r"no audio files in this folder \(readable: .wav .* .opus"):
        audio_files(tmp_path)


def test_hidden_files_and_folders_are_not_audio(tmp_path):
    """macOS AppleDouble `._clip.wav` (not audio at all), dot-files and dot-folders are left out."""
    _tone(tmp_path / "clip.wav", "WAV", "PCM_16")
    (tmp_path / "._clip.wav").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble header
    _tone(tmp_path / ".dotfile.wav", "WAV", "PCM_16")
    (tmp_path / ".hidden").mkdir()
    _tone(tmp_path / ".hidden" / "h.wav", "WAV", "PCM_16")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "._x.flac").write_bytes(bytes(64))
    _tone(tmp_path / "sub" / "x.flac", "FLAC", "PCM_16")
    assert audio_files(tmp_path) == [tmp_path / "clip.wav", tmp_path / "sub" / "x.flac"]


def test_the_undecodable_warning_is_given_once_per_folder(tmp_path):
    """Build and verify list a folder more than once (hashing it, then reading it): one warning line."""
    _tone(tmp_path / "ok.wav", "WAV", "PCM_16")
    (tmp_path / "a.m4a").write_bytes(bytes(64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        audio_files(tmp_path)
        audio_files(tmp_path)
    assert len([w for w in caught if issubclass(w.category, SalmonnWarning)]) == 1
