"""`build`: recipes, LoRA merge, GPTQ vs RTN, MatMulNBits packing, bundle validity and failure modes."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from salmonn_export.bundle import FORMAT_VERSION, read_manifest
from salmonn_export.errors import SalmonnError
from salmonn_export.export.build import BuildOptions, build_bundle
from salmonn_export.export.matmul_nbits import pack_codes, unpack_codes
from salmonn_export.export.onnx_export import session
from salmonn_export.recipes import load_recipe, parse_recipe
from salmonn_export.transforms.calibration import build_calibration, calibration_items
from salmonn_export.transforms.lora import merge_error, merged_llm
from salmonn_export.transforms.quantize import output_error, quantize_model


@pytest.fixture(scope="module")
def calib(tiny_model, calib_audio_dir):
    return build_calibration(tiny_model, calibration_items(calib_audio_dir), load_recipe("w4a16").calibration)


@pytest.fixture(scope="module")
def bundles(tiny_dir, calib_audio_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for name in ("fp32", "w4a16"):
        out[name] = build_bundle(tiny_dir / "config.yaml", load_recipe(name),
                                 BuildOptions(out=root / name, calib=calib_audio_dir))
    return out


def test_lora_merge_equals_adapter_model(tiny_model):
    merged = merged_llm(tiny_model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        scale = float(tiny_model.causal_lm(inputs_embeds=torch.randn(1, 4, 64)).logits.abs().max())
    assert merge_error(tiny_model, merged) <= 1e-5 * max(scale, 1.0)


def test_gptq_beats_rtn_on_the_same_weights_and_data(tiny_model, calib):
    merged = merged_llm(tiny_model)
    errors = {}
    for name in ("w4a16", "w4a16-rtn"):
        recipe = load_recipe(name)
        model = copy.deepcopy(merged)
        result = quantize_model(model, recipe.llm.weights, recipe.llm.skip_modules, calib)
        errors[name] = np.mean([output_error(model, merged, layer, calib) for layer in result.layers])
    assert errors["w4a16"] < 0.85 * errors["w4a16-rtn"], errors


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    for bits in (4, 8):
        codes = rng.integers(0, 2**bits, size=(48, 256), dtype=np.uint8)
        packed = pack_codes(codes, bits, 64)
        assert packed.shape == (48, 4, 64 * bits // 8)
        np.testing.assert_array_equal(unpack_codes(packed, bits, 256), codes)


def test_every_component_matches_pytorch(bundles):
    for recipe, report in bundles.items():
        manifest = read_manifest(report["bundle"])
        assert set(manifest["components"]) == {"whisper_encoder", "beats", "qformer", "decoder"}
        for name, comp in manifest["components"].items():
            v = comp["validation"]
            assert v["passed"] and v["max_rel"] < 1e-4 and v["cosine"] > 0.99999, (recipe, name, v)


def test_int4_decoder_runs_in_ort_with_matmul_nbits_from_the_gptq_codes(bundles, tiny_model, calib):
    bundle = bundles["w4a16"]["bundle"]
    manifest = read_manifest(bundle)
    assert manifest["components"]["decoder"]["matmul_nbits"] == 8  # per layer: packed qkv, o, packed gate|up, down
    assert manifest["quantization"]["method"] == "gptq"
    import onnx

    graph = onnx.load(f"{bundle}/decoder.onnx", load_external_data=False).graph
    names = [n.name for n in graph.node if n.op_type == "MatMulNBits"]
    assert "/model/layers.0/attn/qkv_proj/MatMulNBits" in names
    assert [n.name for n in graph.node if n.op_type == "GroupQueryAttention"][0] == "/model/layers.0/attn/GroupQueryAttention"
    # logits of the int4 graph vs the merged fp32 LLM on a real audio-conditioned prompt
    sess = session(f"{bundle}/decoder.onnx")
    seq = calib[0]
    S = seq["inputs_embeds"].shape[1]
    llm = manifest["llm"]
    feeds = {"inputs_embeds": seq["inputs_embeds"].numpy(), "attention_mask": seq["attention_mask"].numpy(),
             "position_ids": np.arange(S)[None]}
    for i in range(llm["layers"]):
        for kind in ("key", "value"):
            feeds[f"past_{kind}_{i}"] = np.zeros((1, llm["kv_heads"], 0, llm["head_dim"]), np.float32)
    logits = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = merged_llm(tiny_model)(**seq).logits[:, -1:].numpy()  # the graph gives the last position's logits
    cos = float((logits * ref).sum() / np.linalg.norm(logits) / np.linalg.norm(ref))
    # random tiny weights: int4 moves logits a lot; the trained demo model is where quality is judged
    assert cos > 0.5, cos
    assert manifest["quantization"]["llm_eval_on_calibration"]["positions"] > 0


def test_bundle_is_deterministic(bundles, tiny_dir, calib_audio_dir, tmp_path):
    again = build_bundle(tiny_dir / "config.yaml", load_recipe("w4a16"),
                         BuildOptions(out=tmp_path / "again", calib=calib_audio_dir))
    first = json.loads(open(f"{bundles['w4a16']['bundle']}/manifest.json").read())
    second = json.loads(open(f"{again['bundle']}/manifest.json").read())
    assert first["files"] == second["files"]


def test_manifest_detects_missing_altered_and_newer_bundles(bundles, tmp_path):
    src = bundles["fp32"]["bundle"]
    for case in ("missing", "altered", "newer"):
        dst = tmp_path / case
        shutil.copytree(src, dst)
        if case == "missing":
            (dst / "embed_tokens.npy").unlink()
            match = "embed_tokens.npy` is missing"
        elif case == "altered":
            data = bytearray((dst / "qformer.onnx.data").read_bytes())
            data[100] ^= 0xFF
            (dst / "qformer.onnx.data").write_bytes(bytes(data))
            match = "qformer.onnx.data` was altered"
        else:
            m = json.loads((dst / "manifest.json").read_text())
            m["format_version"] = FORMAT_VERSION + 1
            (dst / "manifest.json").write_text(json.dumps(m))
            match = "upgrade salmonn-export"
        with pytest.raises(SalmonnError, match=match):
            read_manifest(dst)


def test_bad_recipes_and_outputs(tiny_dir, tmp_path, bundles):
    with pytest.raises(SalmonnError, match="unknown recipe `w3a7`"):
        load_recipe("w3a7")
    for missing in (tmp_path / "mine.yaml", tmp_path / "recipes" / "w4a16", "recipes/mine.yml"):
        with pytest.raises(SalmonnError, match="recipe file does not exist") as err:
            load_recipe(missing)
        assert err.value.path == str(Path(missing).expanduser())
    with pytest.raises(SalmonnError, match=r"components\.llm\.weights\.bitz"):
        parse_recipe({"name": "x", "components": {"llm": {"weights": {"bitz": 4}}}})
    with pytest.raises(SalmonnError, match="group_size` must be a power of two"):
        parse_recipe({"name": "x", "components": {"llm": {"weights": {"group_size": 100}}}})
    with pytest.raises(SalmonnError, match="use --force"):
        build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=Path(bundles["fp32"]["bundle"])))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SalmonnError, match="cannot write the bundle here"):
        build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=blocker / "sub" / "b"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "beats.pt").unlink()
    with pytest.raises(SalmonnError, match="beats.pt: BEATs checkpoint not found"):
        build_bundle(broken / "config.yaml", load_recipe("fp32"), BuildOptions(out=tmp_path / "never"))
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))


def test_trt_request_without_tensorrt_is_skipped_and_recorded(tiny_dir, tmp_path):
    from salmonn_export.export.tensorrt import availability, profile_ranges
    from salmonn_export.recipes import TrtSettings

    ok, reason = availability()
    if ok:
        pytest.skip("TensorRT is installed here; this test covers machines without it")
    report = build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=tmp_path / "b", trt=True))
    manifest = read_manifest(report["bundle"])
    assert manifest["tensorrt"] == {"status": "skipped", "reason": reason}
    assert not list((tmp_path / "b").glob("*.engine"))  # never a placeholder engine
    ranges = profile_ranges("beats", {"fbank": ["batch", "frames", 128], "padding_mask": ["batch", "tokens"]},
                            TrtSettings(max_batch=4, max_beats_frames=2998))
    assert ranges["fbank"] == ((1, 98, 128), (1, 998, 128), (4, 2998, 128))
    assert ranges["padding_mask"] == ((1, 48), (1, 496), (4, 1496))


def test_fp16_recipe_builds_and_runs_beside_fp32(bundles, tiny_dir, calib_audio_dir, tmp_path):
    """fp16: every graph validated at build (the decoder's fp16 past/present fed as fp16), then the
    engine's end-to-end logits match the fp32 bundle's on a real clip."""
    from salmonn_export.audio import load_audio
    from salmonn_export.runtime.engine import Engine
    from salmonn_export.runtime.generation import positions_from_mask

    report = build_bundle(tiny_dir / "config.yaml", load_recipe("fp16"), BuildOptions(out=tmp_path / "fp16"))
    assert set(report["validation"]) == {"whisper_encoder", "beats", "qformer", "decoder"}
    manifest = read_manifest(tmp_path / "fp16")
    past = next(i for i in manifest["components"]["decoder"]["inputs"] if i["name"] == "past_key_0")
    assert past["dtype"] == "float16"
    clip = sorted(calib_audio_dir.glob("*.wav"))[0]
    logits = {}
    for name, folder in (("fp16", tmp_path / "fp16"), ("fp32", Path(bundles["fp32"]["bundle"]))):
        eng = Engine(folder)
        embeds, mask = eng.prompt_wrap(eng.encode_speech([load_audio(clip)]), ["asr"])
        step, _ = eng.decoder_step(embeds, mask, positions_from_mask(mask), None)
        logits[name] = np.asarray(step[:, -1], dtype=np.float64)
    a, b = logits["fp16"].ravel(), logits["fp32"].ravel()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


def test_validation_runs_pytorch_before_the_model_is_freed(tiny_model, tmp_path):
    """validate_component computes every PyTorch output before `release` (the build frees the model
    there so a 3B fp32 decoder and its torch layers are never resident together): with the wrapper
    moved to the meta device by `release`, validation still compares real numbers and passes."""
    import copy as copy_module

    from salmonn_export.export.onnx_export import export_component, validate_component
    from salmonn_export.export.specs import qformer_spec

    model = copy_module.deepcopy(tiny_model)
    spec = qformer_spec(model)
    path = export_component(spec, tmp_path)
    released = []

    def release():
        model.to("meta")
        released.append(True)

    result = validate_component(spec, path, release=release)
    assert released and result["passed"] and result["cosine"] > 0.99999
    assert next(model.parameters()).device.type == "meta"


def test_int8_activation_decoder_is_validated_on_its_own_kernel(challenge_fixture, challenge_tied_fixture,
                                                                calib_audio_dir, tmp_path):
    """int8-activation recipes (accuracy_level 4): the decoder graph is validated exactly against
    PyTorch with fp32 compute, then switched to level 4 and run on ORT's prepacked int8 kernel, whose
    logits visibly differ (max relative error > 1e-3: the real kernel ran, not its fp32 fallback).
    The builds a fresh user saw fail on a seed-dependent cosine (0.88 at seed 3 on the untied fixture,
    0.98 on the tied one at seed 0) now build."""
    for name, fixture, seed in (("tied", challenge_tied_fixture, 0), ("untied", challenge_fixture, 3)):
        report = build_bundle(fixture / "config.yaml", load_recipe("w4a8-lmhead"),
                              BuildOptions(out=tmp_path / name, calib=calib_audio_dir, seed=seed))
        assert report["validation"]["decoder"]["max_rel"] < 1e-4, name
        check = read_manifest(tmp_path / name)["components"]["decoder"]["int8_activations"]
        assert check["accuracy_level"] == 4 and check["max_rel_vs_fp32_compute"] > 1e-3, (name, check)
        assert 0.5 <= check["cosine_vs_fp32_compute"] < 1.0


def _matmul_graph(path: Path, rows: int, cols: int, layers: int = 1) -> None:
    """x [1, rows] → `layers` × (MatMul W [rows, rows] + b) → MatMul [rows, cols] → y, weights in `path`.data
    (the layout every exported graph has: many tensors, each under protobuf's 2 GB, however large the sum)."""
    from onnx import TensorProto, helper, numpy_helper

    from salmonn_export.export.onnx_export import save_model

    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for layer in range(layers + 1):
        width = cols if layer == layers else rows
        scale = np.float32(1 / np.sqrt(rows))
        weights += [numpy_helper.from_array(rng.standard_normal((rows, width), dtype=np.float32) * scale,
                                            f"encoder.{layer}.w"),
                    numpy_helper.from_array(rng.standard_normal(width, dtype=np.float32), f"encoder.{layer}.b")]
        out = "y" if layer == layers else f"h{layer}"
        nodes += [helper.make_node("MatMul", [current, f"encoder.{layer}.w"], [f"m{layer}"], name=f"encoder/{layer}/MatMul"),
                  helper.make_node("Add", [f"m{layer}", f"encoder.{layer}.b"], [out], name=f"encoder/{layer}/Add")]
        current = out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])], weights)
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_fp16_conversion_equals_the_converters_own_shape_inference(tmp_path):
    """`_to_fp16` infers shapes from the file (so graphs over protobuf's 2 GB convert); on a small graph
    the result is the converter's in-memory way, node for node and weight for weight."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from salmonn_export.export.build import _to_fp16

    path = tmp_path / "g.onnx"
    _matmul_graph(path, 64, 32)
    expected = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=False)
    _to_fp16(path)
    got = onnx.load(str(path))
    assert sorted((n.op_type, list(n.input), list(n.output)) for n in got.graph.node) == \
           sorted((n.op_type, list(n.input), list(n.output)) for n in expected.graph.node)  # ours topologically sorted
    for a, b in zip(got.graph.initializer, expected.graph.initializer):
        assert a.name == b.name and a.data_type == b.data_type == onnx.TensorProto.FLOAT16
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]  # no inference file left


@pytest.mark.slow
def test_fp16_conversion_of_a_graph_over_2_gb(tmp_path):
    """The real-size Whisper encoder's fp32 graph is 2.5 GB: converting it failed ("Failed to serialize
    proto") while the converter serialized the model for its shape inference."""
    import onnxruntime as ort

    from salmonn_export.export.build import _to_fp16

    path = tmp_path / "big.onnx"
    rows, cols = 13_500, 64  # three 729 MB layers: 2.19 GB of fp32 weights, like the 2.5 GB Whisper encoder
    _matmul_graph(path, rows, cols, layers=3)
    assert (tmp_path / "big.onnx.data").stat().st_size > 2**31
    x = np.random.default_rng(1).standard_normal((1, rows), dtype=np.float32)
    run = lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    expected = run()
    _to_fp16(path)
    assert (tmp_path / "big.onnx.data").stat().st_size < 2**31
    assert {t.data_type for t in onnx.load(str(path), load_external_data=False).graph.initializer} == {onnx.TensorProto.FLOAT16}
    got = run()
    assert got.dtype == np.float32 and got.shape == (1, cols)  # fp32 inputs and outputs kept (keep_io_types)
    cosine = float(np.dot(got[0], expected[0]) / np.linalg.norm(got[0]) / np.linalg.norm(expected[0]))
    assert cosine > 0.999, cosine
