"""The embedded demo model: built on first use, reused while fresh, rebuilt when stale."""

import json

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
