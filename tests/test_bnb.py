"""A bitsandbytes-NF4 LLM folder is dequantized on load from its stored quant state."""

import json

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
    expected = (NF4[idx] * deq_absmax[:, None]).reshape(w.shape)
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
