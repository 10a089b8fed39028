"""Recipe options beyond the LLM weight format. int8 (ONNX Runtime dynamic quantization) encoder and
Q-Former graphs: which MatMuls become int8,
that the bundle still runs and stays close to the fp32 bundle on real audio, and recipe errors;
text-only calibration."""

import json

import numpy as np
import onnx
import pytest
import torch
import yaml

from salmonn_export.errors import SalmonnError
from salmonn_export.export.build import BuildOptions, _after_gelu, build_bundle
from salmonn_export.recipes import RECIPES_DIR, load_recipe, parse_recipe


@pytest.fixture(scope="module")
def int8_bundle(tiny_dir, calib_audio_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    data = yaml.safe_load((RECIPES_DIR / "w4a8-int8enc.yaml").read_text())
    data["components"]["llm"] = {"precision": "fp32"}  # int8 encoders only: no GPTQ in this test
    recipe = parse_recipe({**data, "name": "int8-encoders"})
    report = build_bundle(tiny_dir / "config.yaml", recipe, BuildOptions(out=root / "int8", calib=calib_audio_dir))
    fp32 = build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=root / "fp32", calib=calib_audio_dir))
    return root / "int8", root / "fp32", report, fp32


def test_int8_graphs_quantize_matmuls_but_not_gelu_outputs(int8_bundle):
    bundle, _, report, _ = int8_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ("whisper_encoder", "beats", "qformer"):
        comp = manifest["components"][name]
        assert comp["precision"] == "int8"
        graph = onnx.load(str(bundle / comp["file"]), load_external_data=False).graph
        ops = [n.op_type for n in graph.node]
        assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == comp["int8_matmuls"] > 0
        assert comp["fp32_after_gelu"] >= 1  # one MLP down projection per layer stays fp32
        kept = set(_after_gelu(onnx.load(str(bundle / comp["file"]), load_external_data=False)))
        assert len(kept) == comp["fp32_after_gelu"]  # still plain MatMuls in the int8 graph
        assert report["validation"][name]["cosine"] >= 0.995
    assert manifest["components"]["decoder"]["precision"] == "fp32"


def test_int8_bundle_is_smaller_and_close_to_fp32_on_speech(int8_bundle, audio_dir):
    from salmonn_export.runtime.engine import Engine

    int8, fp32, report, fp32_report = int8_bundle
    assert report["sizes"]["qformer"] < 0.6 * fp32_report["sizes"]["qformer"]
    for name in ("whisper_encoder", "beats"):  # tiny preset: convolutions and kept fc2 weigh more here
        assert report["sizes"][name] < fp32_report["sizes"][name]
    from salmonn_export.audio import load_audio

    wave = load_audio(next(p for p in sorted(audio_dir.glob("*.wav")) if p.name != "broken.wav"))
    ea, eb = Engine(int8).encode_speech([wave]), Engine(fp32).encode_speech([wave])
    cos = float((ea * eb).sum() / np.linalg.norm(ea) / np.linalg.norm(eb))
    assert 0.99 < cos < 1.0  # quantized, and still the same speech


@pytest.mark.parametrize("component, precision, message", [
    ("llm", "int8", "components.llm.precision: int8"),
    ("whisper", "int4", "must be one of"),
    ("qformer", "bf16", "must be one of"),
])
def test_bad_precisions_are_errors_naming_the_field(component, precision, message):
    with pytest.raises(SalmonnError, match=message):
        parse_recipe({"name": "x", "components": {component: {"precision": precision}}})


def test_text_only_calibration_has_no_speech_and_needs_texts(tiny_model, audio_dir, tmp_path):
    """calibration.source text: the same prompt wrap with zero speech embeddings plus the reference
    text (shorter than the audio sequences by exactly the speech tokens); an audio folder without
    texts is an error."""
    from dataclasses import replace

    from salmonn_export.transforms.calibration import CalibItem, build_calibration

    clip = next(p for p in sorted(audio_dir.glob("*.wav")) if p.name != "broken.wav")
    items = [CalibItem(clip, "hello there", "asr")]
    audio = load_recipe("w4a16").calibration
    text = load_recipe("w4a16-textcalib").calibration
    assert text == replace(audio, source="text")
    a, t = build_calibration(tiny_model, items, audio), build_calibration(tiny_model, items, text)
    assert a[0]["inputs_embeds"].shape[1] - t[0]["inputs_embeds"].shape[1] == tiny_model.speech_tokens
    assert torch.equal(a[0]["inputs_embeds"][:, -5:], t[0]["inputs_embeds"][:, -5:])  # the same teacher-forced text
    with pytest.raises(SalmonnError, match="needs an annotation .json whose items have texts"):
        build_calibration(tiny_model, [CalibItem(clip)], text)
    with pytest.raises(SalmonnError, match="calibration.source` must be audio or text"):
        parse_recipe({"name": "x", "calibration": {"source": "video"}})
