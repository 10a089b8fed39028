"""A bitsandbytes-NF4 LLM folder is dequantized on load from its stored quant state."""

import json
import math
from pathlib import Path

import pytest
import torch

from salmonn_export.model.llm import dequantize_bnb_4bit

NF4 = torch.tensor([-1.0, -0.6961928, -0.5250730, -0.3949175, -0.2844414, -0.1848460, -0.0910500, 0.0,
                    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


def quantize_nf4(w: torch.Tensor, blocksize=64, nested_blocksize=256):
    """Reference NF4 + double quantization, written from the bitsandbytes format description."""
    flat = w.reshape(-1)
    blocks = flat.view(-1, blocksize)
    absmax = blocks.abs().amax(1)
    idx = (blocks / absmax[:, None]).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    packed = ((idx[:, 0::2] << 4) | idx[:, 1::2]).to(torch.uint8).reshape(-1, 1)
    offset = absmax.mean()
    n_blocks = absmax.numel()
    padded = torch.nn.functional.pad(absmax - offset, (0, (-n_blocks) % nested_blocksize))
    centred = padded.view(-1, nested_blocksize)
    nested_absmax = centred.abs().amax(1)
    code = torch.linspace(-1, 1, 256)
    q8 = (centred / nested_absmax[:, None]).unsqueeze(-1).sub(code).abs().argmin(-1).to(torch.uint8).reshape(-1)[:n_blocks]
    deq_absmax = code[q8.long()] * nested_absmax.repeat_interleave(nested_blocksize)[:n_blocks] + offset
    expected = (NF4[idx] * deq_absmax[:, None]).reshape(w.shape).half().float()  # written in the state's dtype
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float16", "shape": list(w.shape),
             "nested_blocksize": nested_blocksize, "nested_dtype": "float32", "nested_offset": float(offset)}
    return packed, q8, NF4, nested_absmax, code, state, expected


def test_nf4_double_quant_dequantizes_exactly():
    w = torch.randn(64, 512)
    packed, absmax, qmap, nested_absmax, nested_map, state, expected = quantize_nf4(w)
    raw_state = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    qs = json.loads(bytes(raw_state.tolist()).decode())
    out = dequantize_bnb_4bit(packed, absmax, qmap, qs, nested_absmax, nested_map)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert (out - w).abs().mean() < 0.1 * w.abs().mean()


def test_nf4_llm_folder_loads_dequantized(tiny_dir, tmp_path):
    """An HF folder in the bnb-4bit serialization (as unsloth ships) loads with NF4-dequantized weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from salmonn_export.model.llm import load_base_llm

    folder = tmp_path / "llm-bnb"
    shutil.copytree(tiny_dir / "llm", folder)
    state = load_file(folder / "model.safetensors")
    expected = {}
    for name in [k for k in state if ".layers." in k and k.endswith("_proj.weight")]:
        packed, q8, qmap, nested_absmax, code, qs, deq = quantize_nf4(state[name])
        expected[name] = deq
        state[name] = packed
        state[f"{name}.absmax"] = q8
        state[f"{name}.quant_map"] = qmap.clone()
        state[f"{name}.nested_absmax"] = nested_absmax
        state[f"{name}.nested_quant_map"] = code.clone()
        state[f"{name}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(qs).encode()), dtype=torch.uint8)
    save_file(state, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                     "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float16",
                                     "llm_int8_skip_modules": ["lm_head", "embed_tokens"]}
    (folder / "config.json").write_text(json.dumps(config))
    model = load_base_llm(folder)
    own = model.state_dict()
    assert len(expected) == 14
    for name, deq in expected.items():
        torch.testing.assert_close(own[name], deq, rtol=0, atol=1e-6)
    assert torch.equal(own["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def _bnb_nf4_folder(src: Path, out: Path):
    """The LLM folder `src` quantized to NF4 + double quantization and saved by bitsandbytes itself
    (transformers' BitsAndBytesConfig on CPU, `save_pretrained`), tokenizer files copied beside it.
    Returns (folder, the in-memory bitsandbytes model)."""
    import shutil

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=config, device_map="cpu",
                                                 dtype=torch.float16)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    return out, model


def test_nf4_base_written_by_bitsandbytes_dequantizes_as_bitsandbytes_does(tiny_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from salmonn_export.model.llm import load_base_llm

    folder, bnb_model = _bnb_nf4_folder(tiny_dir / "llm", tmp_path / "llm-nf4")
    stored = load_file(folder / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert {k for k in stored if k.startswith(q)} == {q, *(f"{q}.{s}" for s in (
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"))}
    assert stored[q].dtype == torch.uint8
    own = load_base_llm(folder).state_dict()
    quantized = {name: m for name, m in bnb_model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantized) == 14
    for name, module in quantized.items():
        theirs = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(own[f"{name}.weight"], theirs.float()), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(own[name], bnb_model.state_dict()[name].float()), name


def test_salmonn_on_a_bitsandbytes_written_nf4_base_loads_and_generates(tiny_dir, tmp_path, audio_dir):
    """The training checkpoint's LoRA sits on the NF4 base as the challenge trained it (spec 8.8)."""
    pytest.importorskip("bitsandbytes")
    from salmonn_export.model.salmonn import load_salmonn

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    for entry in tiny_dir.iterdir():
        if entry.name not in ("llm", "config.yaml"):
            (model_dir / entry.name).symlink_to(entry)
    (model_dir / "config.yaml").write_text((tiny_dir / "config.yaml").read_text())
    _bnb_nf4_folder(tiny_dir / "llm", model_dir / "llm")
    model = load_salmonn(model_dir / "config.yaml")
    plain = load_salmonn(tiny_dir / "config.yaml")
    assert model.load_report["loaded"] == plain.load_report["loaded"]
    base = model.causal_lm.model.layers[0].mlp.down_proj.weight
    reference = plain.causal_lm.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(base, reference) and (base - reference).abs().mean() < 0.1 * reference.abs().mean()
    texts = model.transcribe([audio_dir / "speech_a.wav"], "asr", max_new_tokens=4)
    assert len(texts) == 1 and isinstance(texts[0], str)


LLAMA32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Llama-3.1's frequency rule, written from Meta's reference (apply_scaling), in float64."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / scaling["low_freq_factor"], old / scaling["high_freq_factor"]
    out = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / scaling["factor"])
        else:
            smooth = (old / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
            out.append((1 - smooth) * f / scaling["factor"] + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def test_llama32_config_as_446_wrote_it_loads_with_the_same_values(tiny_dir, tmp_path):
    """Llama-3.2-1B-Instruct's config.json keys and values (transformers 4.4x form: rope_scaling llama3,
    top-level rope_theta, eos list, torch_dtype bfloat16, tied), tiny dimensions."""
    import shutil

    from salmonn_export.model.llm import load_base_llm

    folder = tmp_path / "llm"
    shutil.copytree(tiny_dir / "llm", folder)
    ours = json.loads((folder / "config.json").read_text())
    eos = [ours["eos_token_id"], ours["eos_token_id"] + 7, ours["eos_token_id"] + 8]
    config = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": ours["bos_token_id"], "eos_token_id": eos, "head_dim": 16, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": LLAMA32_ROPE,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3", "use_cache": True, "vocab_size": ours["vocab_size"],
    }
    (folder / "config.json").write_text(json.dumps(config))
    model = load_base_llm(folder)
    assert next(model.parameters()).dtype == torch.float32  # the reference runs fp32 whatever torch_dtype says
    assert model.config.rope_parameters == {"rope_theta": 500000.0, **LLAMA32_ROPE}
    assert model.config.eos_token_id == eos and model.config.max_position_embeddings == 131072
    expected = _llama3_inv_freq(16, 500000.0, LLAMA32_ROPE)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert (expected < 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)).any()  # scaling bites
