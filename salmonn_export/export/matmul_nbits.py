"""Put quantized Linear weights into the decoder graph as ONNX Runtime `MatMulNBits` nodes.

The integer codes and scales come from the quantizer itself (GPTQ or RTN) and are only
re-laid-out, never re-quantized: B uint8 [N, K/block, block·bits/8] (4-bit: even k in the low
nibble), scales [N, K/block], no zero_points input (symmetric: ORT's default zero point
2^(bits-1) is the quantizer's). Each replaced MatMul is found by its hierarchical node name
(`/llm/model/layers.0/self_attn/q_proj/MatMul` ↔ `model.layers.0.self_attn.q_proj`) and its
constant weight is checked against the dequantized codes before it is replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from salmonn_export.errors import SalmonnError
from salmonn_export.transforms.quantize import QuantizedLinear

if TYPE_CHECKING:  # onnx is imported where it is used: the PyTorch engine target packs codes without it
    import onnx


def pack_codes(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """[N, K] uint8 codes → MatMulNBits B [N, K/block, block·bits/8]."""
    n, k = codes.shape
    blocks = codes.reshape(n, k // block, block).astype(np.uint8)
    if bits == 8:
        return blocks
    if bits == 4:
        return (blocks[..., 0::2] & 0xF) | ((blocks[..., 1::2] & 0xF) << 4)
    raise ValueError(f"unsupported bits {bits}")


def unpack_codes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `pack_codes` (used by tests and `inspect`)."""
    n = packed.shape[0]
    if bits == 8:
        return packed.reshape(n, k)
    low, high = packed & 0xF, packed >> 4
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2], out[..., 1::2] = low, high
    return out.reshape(n, k)


def module_name(node_name: str, prefix: str = "/llm/") -> str | None:
    """`/llm/model/layers.0/self_attn/q_proj/MatMul` → `model.layers.0.self_attn.q_proj`."""
    if not node_name.startswith(prefix) or not node_name.endswith("/MatMul"):
        return None
    return node_name[len(prefix):-len("/MatMul")].replace("/", ".")


def inject_matmul_nbits(model: onnx.ModelProto, layers: dict[str, QuantizedLinear], accuracy_level: int = 0,
                        source: str = "decoder.onnx") -> dict[str, int]:
    """Replace the MatMul of every quantized Linear in place. Returns counts for the manifest."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    replaced: set[str] = set()
    new_nodes = []
    removed_inits = []
    for node in model.graph.node:
        name = module_name(node.name) if node.op_type == "MatMul" else None
        if name is None or name not in layers:
            new_nodes.append(node)
            continue
        q = layers[name]
        weight = numpy_helper.to_array(inits[node.input[1]])  # [K, N] = Wᵀ of the dequantized weight
        codes = q.codes.numpy()
        n, k = codes.shape
        if weight.shape != (k, n):
            raise SalmonnError(f"graph weight of {name} has shape {weight.shape}, quantizer gave {(n, k)}", source)
        if not np.allclose(weight, q.dequantize().numpy().T, rtol=0, atol=1e-6):
            raise SalmonnError(f"graph weight of {name} is not the quantized weight (matching by node name failed)", source)
        prefix = node.name[: -len("MatMul")]
        b_name, s_name = f"{prefix}MatMulNBits.B", f"{prefix}MatMulNBits.scales"
        packed = pack_codes(codes, q.bits, q.group_size)
        model.graph.initializer.append(numpy_helper.from_array(packed, b_name))
        model.graph.initializer.append(numpy_helper.from_array(q.scales.numpy().astype(np.float32), s_name))
        new_nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], b_name, s_name], list(node.output), name=f"{prefix}MatMulNBits",
            domain="com.microsoft", K=k, N=n, bits=q.bits, block_size=q.group_size, accuracy_level=accuracy_level,
        ))
        removed_inits.append(node.input[1])
        replaced.add(name)
    missing = sorted(set(layers) - replaced)
    if missing:
        raise SalmonnError(f"no MatMul node found for quantized layers: {', '.join(missing[:4])}", source)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    still_used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name not in removed_inits or i.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"matmul_nbits": len(replaced)}
