"""Int4 weight-only Linear layers on PyTorch's own int4 kernels, from our GPTQ/RTN codes.

The codes and scales are the quantizer's (the ones the ONNX bundle's `MatMulNBits` holds), only
re-laid-out: never re-quantized. PyTorch's int4 kernels ("tinygemm": `_weight_int4pack_mm` on
CUDA, `_weight_int4pack_mm_for_cpu` on CPU) compute per group w = (q − 8)·s + zero with a float
zero; our symmetric codes are w = (q − z)·s with integer zero point z = 2^(bits−1) = 8, so
zero = (8 − z)·s, which is 0 for our quantizer but derived, not assumed.

Layouts (PyTorch ≥ 2.5): CPU `_convert_weight_to_int4pack_for_cpu(int32 [N, K], inner_k_tiles)`;
CUDA `_convert_weight_to_int4pack(uint8 [N, K/2] with even k in the HIGH nibble, inner_k_tiles)`
(the opposite nibble order of MatMulNBits, whose even k sits in the low nibble);
scales_and_zeros [K/group, N, 2] in the activation dtype (bf16 on CUDA). Group sizes 32, 64,
128, 256; K % (16·inner_k_tiles) == 0; N % 16 == 0 (the CPU kernel's rule; CUDA's is N % 8). Act-order GPTQ is stored with
static groups (contiguous groups in natural column order), so no g_idx is needed here.
Why not torchao: its wheels are built against one torch minor version; no single torchao
release matches both this project's CPU torch 2.13 and the lent GPU machine's torch 2.11, and
these two aten ops are what torchao's tinygemm layout calls anyway.
"""

from __future__ import annotations

import torch
from torch import nn

TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_ZERO = 8  # the kernels' implicit code offset


def int4pack_supported(out_features: int, in_features: int, group_size: int, bits: int) -> str | None:
    """None when a layer can run on the int4 kernels, else the reason it cannot (kept dense)."""
    if bits != 4:
        return f"{bits}-bit codes (the kernels are int4)"
    if group_size not in TINYGEMM_GROUPS:
        return f"group {group_size} (the kernels take {', '.join(map(str, TINYGEMM_GROUPS))})"
    if in_features % 32 or out_features % 16:
        return f"shape [{out_features}, {in_features}] (needs K % 32 == 0 and N % 16 == 0)"
    return None


def inner_k_tiles(in_features: int) -> int:
    """The largest tile count (8, 4, 2) whose 16·tiles divides K, as gpt-fast/torchao choose."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"K = {in_features} is not a multiple of 32")


def scales_and_zeros(scales: torch.Tensor, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K/group] scales + integer zero point → the kernels' [K/group, N, 2] (scale, float zero)."""
    scales = scales.float()
    zeros = (TINYGEMM_ZERO - zero_point) * scales
    return torch.stack([scales.t(), zeros.t()], dim=-1).contiguous().to(dtype)


def pack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) → the device's packed int4 weight."""
    tiles = inner_k_tiles(codes.shape[1])
    if device.type == "cuda":
        high_low = ((codes[:, ::2].to(torch.int32) << 4) | codes[:, 1::2].to(torch.int32)).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(high_low.to(device), tiles)
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), tiles)
    raise ValueError(f"no int4 kernel for device {device}")


class Int4Linear(nn.Module):
    """y = x·Wᵀ (+ b) with W = (codes − zero_point)·scales per group, on the int4 kernels.

    codes: uint8 [N, K]; scales: float [N, K/group_size]; x: [..., K] in `dtype` (fp32 allowed
    on CPU, bf16 on CUDA). Raises ValueError for a layer the kernels cannot take
    (`int4pack_supported`)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zero_point: int, group_size: int,
                 bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype):
        super().__init__()
        n, k = codes.shape
        reason = int4pack_supported(n, k, group_size, 4)
        if reason:
            raise ValueError(f"int4 kernels cannot take this layer: {reason}")
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.register_buffer("packed", pack_int4(codes, device))
        self.register_buffer("scales_and_zeros", scales_and_zeros(scales, zero_point, dtype).to(device))
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))
        self._mm = torch.ops.aten._weight_int4pack_mm if device.type == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mm(x.reshape(-1, shape[-1]), self.packed, self.group_size, self.scales_and_zeros)
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        """W as the kernel sees it [N, K] (fp32), read back through the kernel itself (x = I)."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype, device=self.packed.device)
        return self._mm(eye, self.packed, self.group_size, self.scales_and_zeros).t().float()

    def codes(self) -> torch.Tensor:
        """The integer codes [N, K] recovered from the packed weight (scale 1, zero −8 per group)."""
        unit = torch.zeros_like(self.scales_and_zeros)
        unit[..., 0] = 1
        unit[..., 1] = 0
        eye = torch.eye(self.in_features, dtype=unit.dtype, device=self.packed.device)
        q_minus_8 = self._mm(eye, self.packed, self.group_size, unit).t().float()
        return (q_minus_8 + TINYGEMM_ZERO).round().to(torch.uint8)
