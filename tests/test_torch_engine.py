"""The PyTorch engine target: texts equal the reference's (fp32, CPU), int4 codes equal the ONNX
bundle's, the int4 kernel equals the dequantized matmul, clear refusals, no onnx needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch
from onnx import numpy_helper

from salmonn_export.audio import load_audio
from salmonn_export.errors import SalmonnError
from salmonn_export.export.build import BuildOptions, build_bundle
from salmonn_export.export.matmul_nbits import unpack_codes
from salmonn_export.export.torch_bundle import TorchBuildOptions, build_torch_bundle
from salmonn_export.model.synth import sound_scene
from salmonn_export.recipes import load_recipe, parse_recipe
from salmonn_export.runtime.engine import Engine
from salmonn_export.torch_engine import bundle_target
from salmonn_export.torch_engine.engine import TorchEngine
from salmonn_export.torch_engine.int4 import Int4Linear

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 24


def _torch_build(config: Path, recipe, out: Path, **kwargs) -> Path:
    build_torch_bundle(config, recipe, TorchBuildOptions(out=out, **kwargs))
    return out


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calib")
    for i, kind in enumerate(("tone", "chirp", "beeps", "noise")):
        sf.write(folder / f"{kind}.wav", sound_scene(kind, 2.0, seed=i), 16000)
    return folder


@pytest.fixture(scope="module")
def waves():
    return [sound_scene("tone", 2.0).astype(np.float64), sound_scene("chirp", 1.5, seed=2).astype(np.float64)]


@pytest.fixture(scope="module")
def fp32_engine(tiny_dir, tmp_path_factory):
    return TorchEngine(_torch_build(tiny_dir / "config.yaml", load_recipe("fp32"), tmp_path_factory.mktemp("te") / "fp32"))


@pytest.fixture(scope="module")
def int4_bundles(tiny_dir, calib_dir, tmp_path_factory):
    """The same GPTQ recipe (act-order, static groups) built for both targets from the same data."""
    root = tmp_path_factory.mktemp("te4")
    recipe = load_recipe("w4a16")
    options = dict(calib=calib_dir, calib_samples=4)
    onnx_bundle = root / "onnx"
    build_bundle(tiny_dir / "config.yaml", recipe, BuildOptions(out=onnx_bundle, **options))
    return onnx_bundle, _torch_build(tiny_dir / "config.yaml", recipe, root / "torch", **options)


@pytest.mark.parametrize("beams", [1, 4])
def test_fp32_texts_equal_the_reference(tiny_model, fp32_engine, waves, beams):
    for tasks in (["aac", "aac"], ["asr", "aac"]):  # batch 2; mixed tasks put [PAD] before the answer (spec 8.4)
        ref, ref_speech = tiny_model.generate_batch(tiny_model.make_batch(waves, tasks), num_beams=beams,
                                                    max_new_tokens=MAX_NEW)
        out = fp32_engine.run_waves(waves, tasks, num_beams=beams, max_new_tokens=MAX_NEW)
        assert out.texts == ref, tasks
        np.testing.assert_array_equal(out.speech_embeds, ref_speech.numpy())
    # equal lengths: BEATs pads to the longest clip, which changes a shorter clip's features (spec 8.3)
    same_length = [waves[0], sound_scene("chirp", 2.0, seed=2).astype(np.float64)]
    single = [fp32_engine.run_waves([w], ["aac"], num_beams=beams, max_new_tokens=MAX_NEW).texts[0] for w in same_length]
    assert fp32_engine.run_waves(same_length, ["aac", "aac"], num_beams=beams, max_new_tokens=MAX_NEW).texts == single


def test_challenge_made_fixture_texts_are_reproduced(challenge_fixture, tmp_path):
    """The bundle of the checkpoint the challenge's own code wrote gives that code's recorded texts."""
    engine = TorchEngine(_torch_build(challenge_fixture / "config.yaml", load_recipe("fp32"), tmp_path / "b"))
    ann = json.loads((challenge_fixture / "ann.json").read_text())["annotation"]
    for ref_file, batch, beams in (("ref_b1.json", 1, 1), ("ref_b4.json", 1, 4), ("ref_b4_batch2.json", 2, 4)):
        expected = json.loads((challenge_fixture / ref_file).read_text())["items"]
        for start in range(0, len(ann), batch):
            items = ann[start:start + batch]
            out = engine.run_waves([load_audio(challenge_fixture / a["path"]) for a in items], [a["task"] for a in items],
                                   num_beams=beams)
            assert out.texts == [e["text"] for e in expected[start:start + batch]], (ref_file, start)


# the ONNX decoder packs q|k|v and gate|up into one MatMulNBits each (rows concatenated, export/decoder_graph.py)
FUSED = {"attn/qkv_proj": ("q_proj", "k_proj", "v_proj"), "attn/o_proj": ("o_proj",),
         "mlp/gate_up_proj": ("gate_proj", "up_proj"), "mlp/down_proj": ("down_proj",)}


def _onnx_matmul_nbits(bundle: Path) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray, int, int]]:
    """(layer index, fused projection) → (codes [N, K], scales [N, K/block], block, bits) from decoder.onnx."""
    model = onnx.load(str(bundle / "decoder.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            layer, proj = node.name.split("/layers.")[1].split("/", 1)
            packed = numpy_helper.to_array(inits[node.input[1]])
            scales = numpy_helper.to_array(inits[node.input[2]]).reshape(attrs["N"], -1)
            codes = unpack_codes(packed.reshape(attrs["N"], -1), attrs["bits"], attrs["K"])
            out[(int(layer), proj[: -len("/MatMulNBits")])] = (codes, scales, attrs["block_size"], attrs["bits"])
    return out


def test_int4_codes_equal_the_onnx_bundles(int4_bundles):
    onnx_bundle, torch_bundle = int4_bundles
    engine = TorchEngine(torch_bundle)
    onnx_layers = _onnx_matmul_nbits(onnx_bundle)
    assert engine.kernels == {"int4pack": 14, "dense_dequantized": 0, "dense": 1}  # the tiny LLM's own lm_head
    assert json.loads((torch_bundle / "manifest.json").read_text())["quantization"]["act_order"] is True
    assert len(onnx_layers) == 4 * len(engine.llm.layers)
    for (index, fused), (codes, scales, group, bits) in onnx_layers.items():
        layer = engine.llm.layers[index]
        modules = [getattr(layer.self_attn if fused.startswith("attn") else layer, p) for p in FUSED[fused]]
        assert all(isinstance(m, Int4Linear) and m.group_size == group for m in modules) and bits == 4
        # codes read back out of PyTorch's packed int4 weights through its own kernel, rows concatenated
        torch_codes = np.concatenate([m.codes().numpy() for m in modules])
        torch_scales = np.concatenate([m.scales_and_zeros[..., 0].t().numpy() for m in modules])
        np.testing.assert_array_equal(torch_codes, codes, err_msg=f"layer {index} {fused}")
        np.testing.assert_array_equal(torch_scales, scales, err_msg=f"layer {index} {fused}")
        assert not any(m.scales_and_zeros[..., 1].any() for m in modules)  # float zero (8 − z)·s with z = 8


def test_int4_matmul_equals_the_dequantized_matmul(int4_bundles):
    engine = TorchEngine(int4_bundles[1])
    gen = torch.Generator().manual_seed(0)
    for name, module in engine.llm.named_modules():
        if not isinstance(module, Int4Linear):
            continue
        codes, sz = module.codes().float(), module.scales_and_zeros
        weight = (codes - 8) * sz[..., 0].t().repeat_interleave(module.group_size, dim=1)
        torch.testing.assert_close(module.dequantized_weight(), weight, rtol=0, atol=0, msg=name)
        x = torch.randn(5, module.in_features, generator=gen)
        expected = x @ weight.t()
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=name)


@pytest.mark.parametrize("beams", [1, 4])
def test_int4_texts_equal_the_dequantized_model_and_the_onnx_int4_bundle(int4_bundles, waves, beams):
    """The exact check for int4: identical texts to the same codes run as dense dequantized weights
    (what the ONNX graph was validated against) and to the ONNX int4 bundle (MatMulNBits)."""
    onnx_bundle, torch_bundle = int4_bundles
    kernel, dense, ort = TorchEngine(torch_bundle), TorchEngine(torch_bundle, dense=True), Engine(onnx_bundle)
    assert dense.kernels == {"int4pack": 0, "dense_dequantized": 14, "dense": 1}
    for tasks in (["aac", "aac"], ["asr", "aac"]):
        texts = kernel.run_waves(waves, tasks, num_beams=beams, max_new_tokens=MAX_NEW).texts
        assert texts == dense.run_waves(waves, tasks, num_beams=beams, max_new_tokens=MAX_NEW).texts
        assert texts == ort.run_waves(waves, tasks, num_beams=beams, max_new_tokens=MAX_NEW).texts


def test_layers_the_int4_kernels_cannot_take_run_dequantized_and_are_counted(tiny_dir, tmp_path, waves):
    recipe = parse_recipe({"name": "rtn-g16", "components": {"llm": {"weights": {"bits": 4, "group_size": 16,
                                                                                 "method": "rtn"}}}})
    engine = TorchEngine(_torch_build(tiny_dir / "config.yaml", recipe, tmp_path / "g16"))
    assert engine.kernels == {"int4pack": 0, "dense_dequantized": 14, "dense": 1}
    assert engine.run_waves(waves[:1], ["aac"], max_new_tokens=4).texts


def test_refusals(fp32_engine, tmp_path, tiny_dir):
    bundle = fp32_engine.bundle
    if not torch.cuda.is_available():
        with pytest.raises(SalmonnError, match=r"--device cuda: this PyTorch .* sees no CUDA device"):
            TorchEngine(bundle, device="cuda")
    with pytest.raises(SalmonnError, match="unknown --device"):
        TorchEngine(bundle, device="tensorrt")
    assert bundle_target(bundle) == "torch" and bundle_target(tmp_path) == "onnx"
    with pytest.raises(SalmonnError, match="already exists"):
        _torch_build(tiny_dir / "config.yaml", load_recipe("fp32"), bundle)
    copy = tmp_path / "altered"
    copy.mkdir()
    for f in bundle.rglob("*"):
        if f.is_file():
            (copy / f.relative_to(bundle)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(bundle)).write_bytes(f.read_bytes())
    data = bytearray((copy / "llm.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "llm.safetensors").write_bytes(bytes(data))
    with pytest.raises(SalmonnError, match="llm.safetensors` was altered"):
        TorchEngine(copy)


BLOCK_ONNX = """
import sys
for name in ("onnx", "onnxruntime", "onnxscript"):
    sys.modules[name] = None  # as if not installed: `import` raises ImportError, find_spec gives None
"""


def test_torch_target_builds_and_runs_without_onnx_or_onnxruntime(tiny_dir, tmp_path):
    """The lent GPU machine has neither: build + run of the torch target must not import them."""
    code = BLOCK_ONNX + f"""
from pathlib import Path
import numpy as np
from salmonn_export.export.torch_bundle import TorchBuildOptions, build_torch_bundle
from salmonn_export.recipes import load_recipe
from salmonn_export.torch_engine.engine import TorchEngine
out = Path({str(tmp_path / "b")!r})
build_torch_bundle(Path({str(tiny_dir / "config.yaml")!r}), load_recipe("w4a16-rtn"), TorchBuildOptions(out=out))
print(TorchEngine(out).run_waves([np.zeros(16000)], ["aac"], max_new_tokens=3).texts)
assert all(sys.modules[m] is None for m in sys.modules if m.split(".")[0] in ("onnx", "onnxruntime"))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_builds_a_torch_bundle_and_run_picks_the_engine_from_its_manifest(tiny_dir, tmp_path, calib_dir):
    bundle = tmp_path / "cli-torch"
    built = _cli("build", "--target", "torch", "--recipe", "fp32", "--model", tiny_dir / "config.yaml", "--out", bundle)
    assert built.returncode == 0, built.stderr[-1000:]
    assert json.loads((bundle / "manifest.json").read_text())["target"] == "torch"
    ran = _cli("run", "--engine", bundle, "--task", "aac", calib_dir / "tone.wav", "--max-new-tokens", "4", "--json")
    assert ran.returncode == 0, ran.stderr[-1000:]
    assert json.loads(ran.stdout)["providers"] == ["torch:cpu:float32"]
    if not torch.cuda.is_available():
        cuda = _cli("run", "--engine", bundle, "--task", "aac", calib_dir / "tone.wav", "--device", "cuda")
        assert cuda.returncode == 2
        assert cuda.stderr.strip().count("\n") == 0 and "--device cuda: this PyTorch" in cuda.stderr
    bad = _cli("build", "--target", "tensorrt", "--recipe", "fp32", "--model", tiny_dir / "config.yaml", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "unknown --target `tensorrt`" in bad.stderr


def test_static_cache_llama_equals_transformers_with_llama3_rope_gqa_and_tied_embeddings():
    """Llama-3.2 features the tiny preset lacks (llama3 rope scaling, tied lm_head) against HF itself."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from salmonn_export.torch_engine.llama import StaticCacheLlama
    from salmonn_export.torch_engine.weights import DenseLinear

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8, vocab_size=97, tie_word_embeddings=True,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    hf = LlamaForCausalLM(cfg).eval()
    state = hf.state_dict()
    linears = {n: DenseLinear(m.weight.detach(), None) for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head"}
    ours = StaticCacheLlama(LlamaConfig.from_dict(cfg.to_dict()), state, linears, torch.device("cpu"), torch.float32)
    embeds = torch.randn(2, 11, 64)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, -3:] = 0  # right padding, as mixed-task batches have
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        ours.setup_cache(2, 32)
        torch.testing.assert_close(ours.prefill(embeds, mask, positions), expected[:, -1:], rtol=1e-5, atol=1e-5)
        for step in range(3):
            ids = torch.tensor([[5 + step], [7 * step]])
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            pos = (mask.cumsum(-1) - 1)[:, -1:]
            expected = hf(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
            got = ours.decode(ours.embed(ids), pos, torch.tensor([mask.shape[1] - 1]))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_step_is_one_graph_and_gives_the_same_tokens(tiny_dir, tmp_path, waves):
    """The decode step CUDA graphs capture on a GPU compiles whole (fullgraph) here with inductor on
    CPU, through the beam search's cache expansion, and changes no token (~2.5 min of compile)."""
    bundle = _torch_build(tiny_dir / "config.yaml", load_recipe("w4a16-rtn"), tmp_path / "b")
    eager, compiled = TorchEngine(bundle), TorchEngine(bundle, compile_decode=True)
    for beams in (1, 4):
        a = eager.run_waves(waves, ["asr", "aac"], num_beams=beams, max_new_tokens=12)
        b = compiled.run_waves(waves, ["asr", "aac"], num_beams=beams, max_new_tokens=12)
        assert a.token_ids == b.token_ids


def test_verify_says_a_torch_bundle_is_not_what_it_compares(fp32_engine):
    """verify on a `--target torch` bundle: one line saying so, exit 2 (it said the bundle was incomplete)."""
    from test_cli import run

    proc = run("verify", fp32_engine.bundle, check=False)
    assert proc.returncode == 2 and "`--target torch` bundle" in proc.stderr and "Traceback" not in proc.stderr
