"""The one audio loader: bit-identical to decoding the whole file (the challenge's way) while decoding only
~31 s, says how much audio past 30 s is dropped, and refuses NaN/±inf samples naming the file."""

import numpy as np
import pytest
import soundfile as sf

from salmonn_export.audio import (
    MAX_SAMPLES,
    audio_seconds,
    dropped_note,
    frames_needed,
    load_audio,
    load_audio_bytes,
    load_clip,
    load_clip_bytes,
    prepare_wave,
)
from salmonn_export.errors import SalmonnError


def _challenge_way(path) -> np.ndarray:
    """What the challenge's evaluator does: decode everything, then channel 0, pad, resample, cut."""
    wave, sr = sf.read(str(path), dtype="float64")
    return prepare_wave(wave, sr)


def _write(path, seconds, rate, channels, subtype, seed=0):
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)
    if channels == 2:
        wave = np.stack([wave, 0.5 * rng.standard_normal(n)], axis=1)
    sf.write(path, np.clip(wave, -1, 1), rate, subtype=subtype)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("fmt, subtype", [("wav", "PCM_16"), ("wav", "FLOAT"), ("flac", "PCM_24")])
def test_prefix_read_is_bit_identical_to_the_whole_file(tmp_path, rate, channels, fmt, subtype):
    for seconds in (45.0, 30.0 + 0.5 * frames_needed(rate) / rate - 15.0, 12.3):
        path = tmp_path / f"a_{rate}_{channels}_{seconds:.1f}.{fmt}"
        _write(path, seconds, rate, channels, subtype)
        clip = load_clip(path)
        expected = _challenge_way(path)
        assert clip.wave.dtype == np.float64 and clip.wave.shape == expected.shape
        np.testing.assert_array_equal(clip.wave, expected)
        assert clip.native_rate == rate and clip.native_seconds == pytest.approx(seconds, abs=1 / rate)
        assert clip.dropped_seconds == pytest.approx(max(0.0, seconds - 30), abs=1 / rate)


@pytest.mark.parametrize("rate", [11025, 32000, 88200, 96000, 192000])
def test_prefix_read_is_bit_identical_at_other_rates(tmp_path, rate):
    path = tmp_path / f"b_{rate}.wav"
    _write(path, 33.0, rate, 1, "DOUBLE", seed=rate)
    np.testing.assert_array_equal(load_audio(path), _challenge_way(path))


def test_long_file_decodes_only_what_the_model_uses(tmp_path, monkeypatch):
    path = tmp_path / "long.wav"
    _write(path, 120.0, 44100, 2, "PCM_16")
    asked = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        asked.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    clip = load_clip(path)
    assert asked == [frames_needed(44100)] and frames_needed(44100) == 30 * 44100 + 44100
    assert len(clip.wave) == MAX_SAMPLES and clip.dropped_seconds == pytest.approx(90.0)
    note = dropped_note(path, clip.native_seconds)
    assert note.startswith(f"{path}: 120.0 s of audio; only the first 30 s are used (90.0 s dropped")
    assert dropped_note(path, 30.0) is None and audio_seconds(path) == pytest.approx(120.0)
    assert len(load_clip_bytes(path.read_bytes()).wave) == MAX_SAMPLES


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_non_finite_samples_are_one_error_naming_the_file(tmp_path, value, subtype, where):
    wave = np.full(16000 * 2, 0.1)
    index = {"first": 0, "middle": 16000, "last": len(wave) - 1}[where]
    wave[index] = value
    path = tmp_path / f"bad_{where}.wav"
    sf.write(path, wave, 16000, subtype=subtype)
    with pytest.raises(SalmonnError) as exc:
        load_audio(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: audio holds 1 non-finite samples (NaN or ±inf), the first at "
                              f"{index / 16000:.3f} s (sample {index})")
    with pytest.raises(SalmonnError, match="^upload: audio holds 1 non-finite"):
        load_audio_bytes(path.read_bytes(), "upload")


def test_non_finite_in_a_stereo_file_and_a_resampled_file(tmp_path):
    wave = np.full((22050, 2), 0.1)
    wave[5, 0] = np.nan
    sf.write(tmp_path / "s.wav", wave, 22050, subtype="FLOAT")
    with pytest.raises(SalmonnError, match="1 non-finite samples .* the first at 0.000 s \\(sample 5\\)"):
        load_audio(tmp_path / "s.wav")
    wave = np.full((22050, 2), 0.1)
    wave[5, 1] = np.nan  # channel 1 is never used (the challenge takes channel 0): no error, same input
    sf.write(tmp_path / "c1.wav", wave, 22050, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "c1.wav"), _challenge_way(tmp_path / "c1.wav"))
    many = np.full(8000 * 3, 0.1)
    many[100:200] = np.nan
    sf.write(tmp_path / "many.wav", many, 8000, subtype="DOUBLE")
    with pytest.raises(SalmonnError, match="many.wav: audio holds 100 non-finite samples"):
        load_audio(tmp_path / "many.wav")


def _eval_set(tmp_path, clips: dict) -> list:
    import json

    from salmonn_export.dataset import read_annotation

    items = []
    for i, (name, (wave, rate)) in enumerate(clips.items()):
        sf.write(tmp_path / name, wave, rate, subtype="FLOAT")
        items.append({"testset_id": f"test{i:04d}", "path": name, "task": "asr", "text": "a reference"})
    (tmp_path / "ann.json").write_text(json.dumps({"annotation": items}))
    return read_annotation(tmp_path / "ann.json", "asr")


def test_eval_goes_through_the_loader(tmp_path):
    from salmonn_export.harness.evaluate import EvalOptions, run_eval

    nan = np.full(16000, 0.1)
    nan[3] = np.nan
    examples = _eval_set(tmp_path, {"ok.wav": (np.full(16000, 0.1), 16000), "nan.wav": (nan, 16000),
                                    "long.wav": (np.full(44100 * 40, 0.1), 44100)})
    seen = []

    def backend(waves, tasks):
        seen.extend(waves)
        return ["a reference"] * len(waves)

    with pytest.raises(SalmonnError, match="nan.wav: audio holds 1 non-finite samples"):
        run_eval(backend, "fake", examples, EvalOptions(out=tmp_path / "a.csv", task="asr"))
    summary = run_eval(backend, "fake", examples, EvalOptions(out=tmp_path / "b.csv", task="asr", skip_bad_audio=True),
                       restart=True)
    assert [s["testset_id"] for s in summary["skipped"]] == ["test0001"]
    assert "non-finite" in summary["skipped"][0]["reason"]
    assert summary["truncated"] == [{"testset_id": "test0002", "audio": str(tmp_path / "long.wav"), "dropped_seconds": 10.0}]
    np.testing.assert_array_equal(seen[-1], _challenge_way(tmp_path / "long.wav"))


def test_calibration_and_the_reference_go_through_the_loader(tmp_path, tiny_model):
    from salmonn_export.recipes import Calibration
    from salmonn_export.transforms.calibration import CalibItem, build_calibration

    wave = np.full(16000, 0.1)
    wave[-1] = np.nan
    sf.write(tmp_path / "nan.flac.wav", wave, 16000, subtype="DOUBLE")
    with pytest.raises(SalmonnError, match="nan.flac.wav: audio holds 1 non-finite samples"):
        build_calibration(tiny_model, [CalibItem(tmp_path / "nan.flac.wav")], Calibration(samples=1))
    with pytest.raises(SalmonnError, match="nan.flac.wav: audio holds 1 non-finite samples"):
        tiny_model.transcribe([tmp_path / "nan.flac.wav"], "asr")
