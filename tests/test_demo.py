"""The embedded demo model: built on first use, reused while fresh, rebuilt when stale."""

import json

import pytest

from salmonn_export.model import demo


def test_demo_built_once_then_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SALMONN_EXPORT_CACHE", str(tmp_path))
    config = demo.ensure_demo_model()
    assert config.is_file() and demo.is_fresh(config.parent)
    mtime = (config.parent / "checkpoint_best.pth").stat().st_mtime_ns
    assert demo.ensure_demo_model() == config
    assert (config.parent / "checkpoint_best.pth").stat().st_mtime_ns == mtime
    stamp = json.loads((config.parent / "DEMO.json").read_text())
    stamp["tool_version"] = "0.0.0-old"
    (config.parent / "DEMO.json").write_text(json.dumps(stamp))
    assert not demo.is_fresh(config.parent)
    demo.ensure_demo_model()
    assert demo.is_fresh(config.parent)
    assert [p.name for p in demo.demo_clips("asr")] == ["speech_0.wav", "speech_1.wav"]


@pytest.mark.parametrize("missing", ["flite", "espeak-ng"])
def test_demo_without_its_synthesizer_stops_clearly_and_leaves_no_half_made_folder(tmp_path, monkeypatch, missing):
    """The demo clips are spoken by flite (a held-out voice); any speech synthesizer that is not installed
    must give its install hint, and the cache must not keep a half-made `.building` folder."""
    import shutil

    from salmonn_export.errors import SalmonnError
    from salmonn_export.model import synth

    monkeypatch.setenv("SALMONN_EXPORT_CACHE", str(tmp_path))
    which = shutil.which
    monkeypatch.setattr(synth.shutil, "which", lambda name: None if name == missing else which(name))
    voices = {"flite": "flite:rms", "espeak-ng": "en-us"}
    monkeypatch.setattr(demo, "DEMO_SENTENCES", [("speech_0.wav", "hello there", voices[missing], 160)])
    with pytest.raises(SalmonnError, match=f"apt-get install {missing}"):
        demo.ensure_demo_model()
    assert list(tmp_path.iterdir()) == []
