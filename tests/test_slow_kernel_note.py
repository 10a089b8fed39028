"""The runtime says when a bundle will decode on ONNX Runtime's slow 8-bit CPU path (w8a16)."""

import pytest

from salmonn_export.recipes import load_recipe
from salmonn_export.runtime.engine import slow_kernel_note


def _manifest(recipe: str) -> dict:
    return {"recipe": load_recipe(recipe).to_dict()}


@pytest.mark.parametrize("recipe", ["w8a16"])
def test_w8a16_on_cpu_is_flagged(recipe):
    note = slow_kernel_note(_manifest(recipe), ["CPUExecutionProvider"])
    assert note is not None and "w8a8" in note and recipe in note


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16", "w4a8", "w4a8-lmhead", "fp32", "fp16"])
def test_fast_recipes_are_not_flagged(recipe):
    assert slow_kernel_note(_manifest(recipe), ["CPUExecutionProvider"]) is None


def test_w8a16_on_gpu_is_not_flagged():
    providers = [("TensorrtExecutionProvider", {}), "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert slow_kernel_note(_manifest("w8a16"), providers) is None
    assert slow_kernel_note(_manifest("w8a16"), ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None


def test_cli_prints_the_warning_once_as_one_line(tmp_path, tiny_dir, audio_dir, calib_audio_dir):
    """The CLI silences library warnings but prints ours: `run` on a w8a16 bundle says so once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from salmonn_export.export.build import BuildOptions, build_bundle

    bundle = tmp_path / "w8a16"
    build_bundle(tiny_dir / "config.yaml", load_recipe("w8a16"), BuildOptions(out=bundle, calib=calib_audio_dir))
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    proc = subprocess.run([sys.executable, str(cli), "run", "--engine", str(bundle), "--task", "asr", "--max-new-tokens", "2",
                           str(audio_dir / "speech_a.wav"), str(audio_dir / "stereo_22k.wav")],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "accuracy_level" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: recipe w8a16:") and "w8a8" in lines[0]
