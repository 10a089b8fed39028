"""Real-size presets (shapes only, no 3B written), sequential GPTQ vs the whole-model GPTQ it replaced,
and quantizing the tied lm_head while the input embeddings keep full precision."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig

from salmonn_export.model.tiny import PRESETS, llama3_specials, train_tokenizer
from salmonn_export.recipes import load_recipe
from salmonn_export.transforms.calibration import build_calibration, calibration_items
from salmonn_export.transforms.lora import merged_llm
from salmonn_export.transforms.quantize import (
    CodesLinear,
    HessianAccumulator,
    _decoder_layers,
    _for_layer,
    gptq,
    quantize_model,
    target_linears,
)


@pytest.fixture(scope="module")
def calib(tiny_model, calib_audio_dir):
    return build_calibration(tiny_model, calibration_items(calib_audio_dir), load_recipe("w4a16").calibration)


@pytest.mark.parametrize("preset, layers, hidden, heads, kv, params_b", [
    ("challenge-3b", 28, 3072, 24, 8, 3.21), ("challenge-1b", 16, 2048, 32, 8, 1.24)])
def test_challenge_presets_have_llama32_shapes(preset, layers, hidden, heads, kv, params_b):
    p = PRESETS[preset]
    assert p.tied and p.fp16 and p.vocab_size == 128256
    cfg = LlamaConfig(vocab_size=p.vocab_size, tie_word_embeddings=p.tied, **p.llama)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        layers, hidden, heads, kv)
    assert cfg.intermediate_size == 8192 and cfg.head_dim == hidden // heads
    rope = getattr(cfg, "rope_scaling", None) or cfg.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n = sum(t.numel() for t in model.parameters())
    assert abs(n / 1e9 - params_b) < 0.01, n  # Llama-3.2-3B: 3.21 B, -1B: 1.24 B (tied)
    w = WhisperConfig(**p.whisper)
    assert (w.d_model, w.encoder_layers, w.encoder_attention_heads, w.num_mel_bins) == (1280, 32, 20, 128)
    assert (p.beats["encoder_layers"], p.beats["encoder_embed_dim"]) == (12, 768)


def test_padded_tokenizer_has_llama3_ids():
    tok = train_tokenizer(256, total=128256)
    assert tok.get_vocab_size() == 128256
    assert [tok.token_to_id(s) for s in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")] == [
        128000, 128001, 128009]
    assert tok.token_to_id(llama3_specials(256)[-1]) == 128255 == tok.token_to_id("<|reserved_special_token_247|>")
    text = "the quick brown fox"
    assert tok.decode(tok.encode(text).ids) == text
    assert max(tok.encode(text).ids) < 128000  # filler ids are never produced by encoding


@torch.no_grad()
def _whole_model_gptq(model, q, skip, calibration):
    """The previous implementation: the whole model over all sequences once per decoder layer."""
    linears = target_linears(model, skip)
    codes = {}
    for layer in _decoder_layers(model):
        names = [n for n, m in linears.items() if any(m is mm for mm in layer.modules())]
        acc = {n: HessianAccumulator(linears[n].in_features) for n in names}
        handles = [linears[n].register_forward_hook(acc[n].hook) for n in names]
        for kwargs in calibration:
            model(**kwargs, use_cache=False)
        for h in handles:
            h.remove()
        for n in names:
            ql = gptq(linears[n].weight, acc[n].hessian, _for_layer(q, linears[n].in_features))
            linears[n].weight.copy_(ql.dequantize())
            codes[n] = ql
    return codes


def test_sequential_gptq_gives_the_whole_model_codes(tiny_model, calib):
    merged = merged_llm(tiny_model)
    recipe = load_recipe("w4a16")
    old = _whole_model_gptq(copy.deepcopy(merged), recipe.llm.weights, recipe.llm.skip_modules, calib)
    new = quantize_model(copy.deepcopy(merged), recipe.llm.weights, recipe.llm.skip_modules, calib)
    assert set(old) == set(new.layers) and len(old) == 14
    differing = {n: int((old[n].codes != new.layers[n].codes).sum()) for n in old}
    assert sum(differing.values()) == 0, differing
    for n in old:
        torch.testing.assert_close(old[n].scales, new.layers[n].scales, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_tied_lm_head_quantized_embeddings_untouched(tiny_model, calib, method):
    """A tied model: quantizing lm_head leaves the input embedding table exactly as it was."""
    merged = merged_llm(tiny_model)
    merged.lm_head.weight = merged.model.embed_tokens.weight  # tie (the tiny preset is untied)
    table = merged.model.embed_tokens.weight.detach().clone()
    recipe = load_recipe("w4a16-lmhead" if method == "gptq" else "w4a16-rtn")
    skip = tuple(s for s in recipe.llm.skip_modules if s != "lm_head")
    result = quantize_model(merged, recipe.llm.weights, skip, calib)
    assert "lm_head" in result.layers and len(result.layers) == 15
    assert torch.equal(merged.model.embed_tokens.weight, table)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    torch.testing.assert_close(merged.lm_head.weight, result.layers["lm_head"].dequantize())
    assert result.errors["lm_head"]["weight_rel_err"] < 0.2
    json.dumps(result.errors)  # plain floats for the manifest


def test_released_weights_are_the_same_model(tiny_model, calib):
    """release_weights (what build uses): codes-only Linears give the dequantized model's outputs."""
    merged = merged_llm(tiny_model)
    recipe = load_recipe("w4a16")
    kept, released = copy.deepcopy(merged), copy.deepcopy(merged)
    a = quantize_model(kept, recipe.llm.weights, recipe.llm.skip_modules, calib)
    b = quantize_model(released, recipe.llm.weights, recipe.llm.skip_modules, calib, release_weights=True)
    assert all(torch.equal(a.layers[n].codes, b.layers[n].codes) for n in a.layers)
    assert not target_linears(released, recipe.llm.skip_modules)  # no fp32 quantized weight left
    assert isinstance(released.model.layers[0].mlp.down_proj, CodesLinear)
    with torch.no_grad():
        torch.testing.assert_close(released(**calib[0]).logits, kept(**calib[0]).logits, rtol=1e-5, atol=1e-5)


def test_low_memory_load_equals_fp32_load(tmp_path):
    """An fp16-stored LLM kept in fp16 and computed in fp32 layer by layer (how build loads a 3B) gives the
    fp32-loaded model's logits, LoRA merge and GPTQ codes exactly."""
    from transformers import AutoModelForCausalLM

    from salmonn_export.model.config import load_config
    from salmonn_export.model.salmonn import SALMONN
    from salmonn_export.model.tiny import write_tiny_salmonn
    from salmonn_export.transforms.lora import merge_in_place

    folder = write_tiny_salmonn(tmp_path / "m", preset="tiny", seed=1)
    llm = AutoModelForCausalLM.from_pretrained(str(folder / "llm"), dtype=torch.float32)
    llm.half().save_pretrained(str(folder / "llm"))  # as the challenge presets store it
    cfg = load_config(folder / "config.yaml")
    full, low = SALMONN(cfg), SALMONN(cfg, low_memory=True)
    layer = low.causal_lm.model.layers[1]
    assert layer.mlp.down_proj.weight.dtype == torch.float16
    assert layer.self_attn.q_proj.base_layer.weight.dtype == torch.float32  # LoRA target: merged in fp32
    embeds = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0)) * 0.3
    with torch.no_grad():
        ref, out = full.causal_lm(inputs_embeds=embeds).logits, low.causal_lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert layer.mlp.down_proj.weight.dtype == torch.float16  # back to storage after the forward
    (m_full, e_full), (m_low, e_low) = merge_in_place(full), merge_in_place(low)
    assert e_low == e_full
    seq = [{"inputs_embeds": embeds[:1], "attention_mask": torch.ones(1, 9, dtype=torch.long)}]
    q = load_recipe("w4a16").llm.weights
    a = quantize_model(m_full, q, ("lm_head",), seq)
    b = quantize_model(m_low, q, ("lm_head",), seq, release_weights=True)
    assert all(torch.equal(a.layers[n].codes, b.layers[n].codes) for n in a.layers)


@pytest.mark.slow
def test_lm_head_recipe_on_the_tied_challenge_fixture(challenge_tied_fixture, tmp_path):
    """w4a16-lmhead on a challenge-written tied model: the graph's lm_head is a MatMulNBits while
    embed_tokens.npy is the full-precision input table ([PAD] row from the checkpoint included)."""
    import numpy as np
    import onnx

    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.model.salmonn import load_salmonn

    config = challenge_tied_fixture / "config.yaml"
    report = build_bundle(config, load_recipe("w4a16-lmhead"),
                          BuildOptions(out=tmp_path / "b", calib=challenge_tied_fixture / "ann.json"))
    bundle = tmp_path / "b"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "lm_head" in manifest["quantization"]["per_layer_error"]
    nodes = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False).graph.node
    heads = [n for n in nodes if "lm_head" in n.name and n.op_type in ("MatMul", "MatMulNBits")]
    assert [n.op_type for n in heads] == ["MatMulNBits"], [(n.name, n.op_type) for n in heads]
    table = load_salmonn(config).causal_lm.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(np.load(bundle / "embed_tokens.npy"), table)
    assert report["validation"]["decoder"]["cosine"] > 0.99999
    assert np.isfinite(report["quantization_eval"]["mean_kl"])


def test_low_memory_reference_generates_the_full_loads_texts(tmp_path, audio_dir):
    """verify loads its reference low-memory (a 3B beside its bundle): same texts as the fp32 load,
    greedy and beam 4, on an fp16-stored LLM with LoRA unmerged."""
    from transformers import AutoModelForCausalLM

    from salmonn_export.model.salmonn import load_salmonn
    from salmonn_export.model.tiny import write_tiny_salmonn

    folder = write_tiny_salmonn(tmp_path / "m", preset="tiny", seed=2)
    llm = AutoModelForCausalLM.from_pretrained(str(folder / "llm"), dtype=torch.float32)
    llm.half().save_pretrained(str(folder / "llm"))
    full = load_salmonn(folder / "config.yaml")
    low = load_salmonn(folder / "config.yaml", low_memory=True)
    assert low.causal_lm.model.layers[0].mlp.down_proj.weight.dtype == torch.float16
    clips = [p for p in sorted(audio_dir.glob("*.wav")) if p.name != "broken.wav"][:2]
    for beams in (1, 4):
        expected = full.transcribe(clips, "asr", num_beams=beams, max_new_tokens=12)
        assert low.transcribe(clips, "asr", num_beams=beams, max_new_tokens=12) == expected
