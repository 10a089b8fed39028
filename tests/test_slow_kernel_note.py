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

