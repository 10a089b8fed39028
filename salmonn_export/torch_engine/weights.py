"""Load a torch bundle's `llm.safetensors` into the static-cache Llama.

Dense tensors load as they are (cast to the LLM dtype). Every quantized Linear is stored as the
ONNX bundle's MatMulNBits initializers (`<name>.qweight` [N, K/group, group·bits/8] uint8,
`<name>.scales` [N, K/group] fp32); its codes are unpacked and handed to `Int4Linear` unchanged.
Layers the int4 kernels cannot take (8-bit codes, groups outside 32–256, narrow shapes) run as
their exact dequantized weight, and are counted as such in `kernels` (never silently).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig

from salmonn_export.errors import SalmonnError
from salmonn_export.export.matmul_nbits import unpack_codes
from salmonn_export.torch_engine.int4 import Int4Linear, int4pack_supported
from salmonn_export.torch_engine.llama import StaticCacheLlama


class DenseLinear(nn.Module):
    """y = x·Wᵀ (+ b), W [N, K] in the LLM dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def quantized_codes(state: dict[str, torch.Tensor], name: str, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K], scales fp32 [N, K/group]) of one quantized layer from the bundle."""
    n, k = info["shape"]
    codes = unpack_codes(state[f"{name}.qweight"].numpy(), info["bits"], k)
    return torch.from_numpy(codes.copy()), state[f"{name}.scales"].float()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zero_point: int, group_size: int) -> torch.Tensor:
    """(codes − zero_point)·scale per group, fp32 [N, K] (transforms.quantize.QuantizedLinear.dequantize)."""
    return (codes.float() - zero_point) * scales.repeat_interleave(group_size, dim=1)


def load_llm(path: Path, spec: dict, device: torch.device, dtype: torch.dtype,
             dense: bool = False) -> tuple[StaticCacheLlama, dict[str, int]]:
    """The LLM on `device` in `dtype`; `dense=True` runs quantized layers as dequantized weights.
    Returns (model, {"int4pack": n, "dense_dequantized": m, "dense": d}). Raises SalmonnError for an
    unreadable file or missing tensors."""
    try:
        state = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise SalmonnError(f"unreadable safetensors ({exc})", path) from None
    cfg = LlamaConfig.from_dict(spec["llm_config"])
    quantized = spec["quantized_layers"]
    names = [f"model.layers.{i}.{p}" for i in range(cfg.num_hidden_layers)
             for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    if not spec["tied_embeddings"]:
        names.append("lm_head")
    kernels = {"int4pack": 0, "dense_dequantized": 0, "dense": 0}
    linears: dict[str, nn.Module] = {}
    try:
        for name in names:
            bias = state.get(f"{name}.bias")
            if name in quantized:
                info = quantized[name]
                codes, scales = quantized_codes(state, name, info)
                if not dense and int4pack_supported(*codes.shape, info["group_size"], info["bits"]) is None:
                    linears[name] = Int4Linear(codes, scales, info["zero_point"], info["group_size"], bias, device, dtype)
                    kernels["int4pack"] += 1
                    continue
                weight = dequantize(codes, scales, info["zero_point"], info["group_size"])
                kernels["dense_dequantized"] += 1
            else:
                weight = state[f"{name}.weight"]
                kernels["dense"] += 1
            linears[name] = DenseLinear(weight.to(device=device, dtype=dtype),
                                        None if bias is None else bias.to(device=device, dtype=dtype))
        model = StaticCacheLlama(cfg, state, linears, device, dtype)
    except KeyError as exc:
        raise SalmonnError(f"llm.safetensors lacks tensor {exc}", path) from None
    return model.eval(), kernels
