"""The LLM decoder as a fused ONNX Runtime graph, written layer by layer with `onnx.helper`.

The graph is the one ONNX Runtime GenAI's model builder writes for Llama (same contrib ops, same
hierarchical names such as `/model/layers.3/attn/GroupQueryAttention`), built here so that it
takes `inputs_embeds` (speech embeddings are spliced in by the runtime) and our own GPTQ/RTN
codes (never re-quantized):

    RMSNormalization (opset 23) / SkipSimplifiedLayerNormalization (RMSNorm + residual add)
    → one packed q|k|v MatMul (or MatMulNBits) → GroupQueryAttention (rotary inside, from
    cos/sin caches the model's own rotary module computes — llama3 `rope_scaling` included; no
    repeat_kv; KV cache in BNSH, past and present may share one preallocated buffer)
    → o_proj → packed gate|up MatMul → SiLU·up → down_proj → … → final norm on the last
    position only → lm_head (MatMul, or MatMulNBits when the lm_head was quantized; a tied
    lm_head is the embedding matrix).

Inputs: inputs_embeds float32 [B, S, H], attention_mask int64 [B, T] (T = past + S; zeros are
padding anywhere in the row), position_ids int64 [B, S], past_key_i / past_value_i float32 (float16
in an fp16 graph)
[B, kv_heads, P, head_dim] where P ≥ T − S (P > T − S only when the runtime binds one buffer of
capacity P as both past and present: GroupQueryAttention then writes the new keys at T − S).
Outputs: logits float32 [B, 1, V] (last position), present_key_i / present_value_i.

Memory: each weight is written to `<name>.data` as soon as its layer is emitted and the proto
keeps only an external-data reference, so a 3B fp32 LLM is never held twice (model + proto).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from salmonn_export.errors import SalmonnError
from salmonn_export.export.matmul_nbits import pack_codes
from salmonn_export.transforms.quantize import QuantizedLinear

MAX_ROPE_POSITIONS = 16384  # cos/sin cache rows (a prompt + answer longer than this is refused by the runtime)
ALIGN = 64


class ExternalData:
    """Appends tensors to one external-data file; returns initializers that point into it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < 1024:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.file.write(data)
        pad = (-len(data)) % ALIGN
        self.file.write(b"\0" * pad)
        self.offset += len(data) + pad
        return tensor

    def close(self) -> None:
        self.file.close()


@dataclass
class DecoderGraphInfo:
    """What the runtime and the manifest need to know about the written graph."""

    max_positions: int
    matmul_nbits: int
    nodes: int
    kv_cache: str = "shared-buffer"  # past_key_i and present_key_i may be bound to one buffer

    def as_dict(self) -> dict:
        return {"graph": "group-query-attention", "kv_cache": self.kv_cache, "max_positions": self.max_positions,
                "matmul_nbits": self.matmul_nbits, "nodes": self.nodes}


def rope_caches(llm: torch.nn.Module, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [positions, head_dim/2] from the model's own rotary module (its
    `rope_scaling`, e.g. llama3, and attention scaling included) — the values HF multiplies by."""
    rotary = llm.model.rotary_emb
    pos = torch.arange(positions, dtype=torch.int64)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, pos)
    half = cos.shape[-1] // 2
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    if not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise SalmonnError("rotary embedding is not of the rotate-half form this graph fuses")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


class _Writer:
    def __init__(self, data: ExternalData, layers: dict[str, QuantizedLinear], accuracy_level: int,
                 float16: bool = False):
        self.data = data
        self.layers = layers
        self.accuracy_level = accuracy_level
        self.float16 = float16  # every float initializer and activation in fp16 (the fp16 recipe)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.nbits = 0

    def init(self, name: str, array: np.ndarray) -> str:
        if self.float16 and array.dtype == np.float32:
            array = array.astype(np.float16)
        self.inits.append(self.data.tensor(name, array))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
             **attrs) -> list[str]:
        outs = outputs if isinstance(outputs, list) else [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def linear(self, x: str, modules: list[tuple[str, torch.nn.Linear]], name: str) -> str:
        """One MatMul (or MatMulNBits) over the row-concatenation of `modules`' weights."""
        quant = [self.layers.get(n) for n, _ in modules]
        if any(getattr(m, "bias", None) is not None for _, m in modules):
            raise SalmonnError(f"{name}: Linear with bias is not supported by the decoder graph")
        if all(q is None for q in quant):
            parts = [m.weight.detach().float().numpy() for _, m in modules]
            w = (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)).T  # [K, N]; one copy when written
            return self.node("MatMul", [x, self.init(f"{name}.weight", w)], f"{name}/MatMul")[0]
        if any(q is None for q in quant) or len({(q.bits, q.group_size) for q in quant}) != 1:
            raise SalmonnError(f"{name}: packed Linears must all be quantized alike")
        for (mod_name, m), q in zip(modules, quant):
            # a module that still holds a float weight must hold the codes' dequantized value (a
            # module replaced by the quantizer's `on_layer` to free memory carries codes only)
            weight = getattr(m, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.shape == q.codes.shape and \
                    not np.allclose(weight.detach().float().numpy(), q.dequantize().numpy(), rtol=0, atol=1e-6):
                raise SalmonnError(f"weight of {mod_name} is not its quantized codes' dequantized value")
        bits, block = quant[0].bits, quant[0].group_size
        codes = np.concatenate([q.codes.numpy() for q in quant], axis=0)
        scales = np.concatenate([q.scales.numpy().astype(np.float32) for q in quant], axis=0)
        n, k = codes.shape
        b = self.init(f"{name}.MatMulNBits.B", pack_codes(codes, bits, block))
        s = self.init(f"{name}.MatMulNBits.scales", scales)
        self.nbits += 1
        return self.node("MatMulNBits", [x, b, s], f"{name}/MatMulNBits", domain="com.microsoft", K=k, N=n,
                         bits=bits, block_size=block, accuracy_level=self.accuracy_level)[0]


def build_decoder_graph(llm: torch.nn.Module, path: Path, layers: dict[str, QuantizedLinear] | None = None,
                        accuracy_level: int = 0, opset: int = 23, float16: bool = False) -> DecoderGraphInfo:
    """Write `path` (+ `path.data`) for the merged (and possibly quantized) Llama `llm`.

    `layers` maps HF module names (`model.layers.0.self_attn.q_proj`, `lm_head`) to their codes;
    those become MatMulNBits with `accuracy_level` (0: fp32 compute; 4: int8 activations).
    `float16`: weights, activations and the KV cache in fp16, written so from the start (inputs_embeds
    and logits stay fp32, cast inside) — converting a written fp32 graph afterwards would load all of
    it into memory (12.8 GB for a 3B).
    Raises SalmonnError for an architecture this graph does not express (biases, non-SiLU MLP,
    sliding windows, non rotate-half rotary)."""
    cfg = llm.config
    if opset < 23:
        raise SalmonnError(f"decoder graph needs opset >= 23 (RMSNormalization), recipe asks {opset}")
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise SalmonnError("decoder graph supports Llama-style LLMs (SiLU MLP, no biases)")
    layers = layers or {}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = float(cfg.rms_norm_eps)
    positions = int(min(getattr(cfg, "max_position_embeddings", MAX_ROPE_POSITIONS), MAX_ROPE_POSITIONS))
    data_path = path.with_name(path.name + ".data")
    data = ExternalData(data_path)
    w = _Writer(data, layers, accuracy_level, float16)
    float_type = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT  # activations and KV cache
    try:
        cos, sin = rope_caches(llm, positions)
        w.init("cos_cache", cos)
        w.init("sin_cache", sin)
        # attention plumbing shared by every layer
        shape_mask = w.node("Shape", ["attention_mask"], "/model/attn_mask/Shape")[0]
        total = w.node("Gather", [shape_mask, w.init("one_i64", np.array(1, dtype=np.int64))], "/model/attn_mask/Gather")[0]
        total32 = w.node("Cast", [total], "/model/attn_mask/total_seq_len/Cast", to=TensorProto.INT32)[0]
        shape_emb = w.node("Shape", ["inputs_embeds"], "/model/embeds/Shape")[0]
        batch = w.node("Slice", [shape_emb, w.init("zero_1", np.array([0], np.int64)), w.init("one_1", np.array([1], np.int64))],
                       "/model/embeds/batch/Slice")[0]
        seq = w.node("Slice", [shape_emb, "one_1", w.init("two_1", np.array([2], np.int64))], "/model/embeds/seq/Slice")[0]
        last = w.node("Sub", [total32, w.init("one_i32", np.array(1, dtype=np.int32))], "/model/attn_mask/seqlens_k/Sub")[0]
        seqlens_k = w.node("Expand", [last, batch], "/model/attn_mask/seqlens_k/Expand")[0]
        mask_f = w.node("Cast", ["attention_mask"], "/model/attn_mask/Cast", to=float_type)[0]
        inv = w.node("Sub", [w.init("one_f", np.array(1.0, np.float32)), mask_f], "/model/attn_mask/Sub")[0]
        lowest = np.finfo(np.float16 if float16 else np.float32).min
        bias2d = w.node("Mul", [inv, w.init("mask_min", np.array(lowest, np.float32))], "/model/attn_mask/Mul")[0]
        bias4d = w.node("Unsqueeze", [bias2d, w.init("axes_1_2", np.array([1, 2], np.int64))], "/model/attn_mask/Unsqueeze")[0]
        target = w.node("Concat", [batch, "one_1", seq, w.node("Shape", ["attention_mask"], "/model/attn_mask/Shape_1",
                                                                start=1)[0]], "/model/attn_mask/Concat", axis=0)[0]
        attn_bias = w.node("Expand", [bias4d, target], "/model/attn_mask/Expand")[0]

        x, residual = "inputs_embeds", None
        if float16:
            x = w.node("Cast", [x], "/model/embeds/Cast", to=float_type)[0]
        for i, layer in enumerate(llm.model.layers):
            p = f"/model/layers.{i}"
            hf = f"model.layers.{i}"
            ln_w = w.init(f"model.layers.{i}.input_layernorm.weight", layer.input_layernorm.weight.detach().float().numpy())
            if residual is None:
                normed = w.node("RMSNormalization", [x, ln_w], f"{p}/input_layernorm/RMSNormalization",
                                axis=-1, epsilon=eps, stash_type=1)[0]
                residual = x
            else:
                normed, _, _, residual = w.node("SkipSimplifiedLayerNormalization", [x, residual, ln_w],
                                                f"{p}/input_layernorm/SkipLayerNorm", outputs=4,
                                                domain="com.microsoft", epsilon=eps)
            at = layer.self_attn
            qkv = w.linear(normed, [(f"{hf}.self_attn.{n}", getattr(at, n)) for n in ("q_proj", "k_proj", "v_proj")],
                           f"{p}/attn/qkv_proj")
            attn, _, _ = w.node("GroupQueryAttention",
                                [qkv, "", "", f"past_key_{i}", f"past_value_{i}", seqlens_k, total32, "cos_cache",
                                 "sin_cache", "position_ids", attn_bias],
                                f"{p}/attn/GroupQueryAttention",
                                outputs=[f"{p}/attn/GroupQueryAttention/output_0", f"present_key_{i}", f"present_value_{i}"],
                                domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1,
                                rotary_interleaved=0, scale=float(getattr(at, "scaling", head_dim ** -0.5)))
            o = w.linear(attn, [(f"{hf}.self_attn.o_proj", at.o_proj)], f"{p}/attn/o_proj")
            post_ln = layer.post_attention_layernorm.weight.detach().float().numpy()
            post_w = w.init(f"{hf}.post_attention_layernorm.weight", post_ln)
            normed, _, _, residual = w.node("SkipSimplifiedLayerNormalization", [o, residual, post_w],
                                            f"{p}/post_attention_layernorm/SkipLayerNorm", outputs=4,
                                            domain="com.microsoft", epsilon=eps)
            mlp = layer.mlp
            gate_up = w.linear(normed, [(f"{hf}.mlp.gate_proj", mlp.gate_proj), (f"{hf}.mlp.up_proj", mlp.up_proj)],
                               f"{p}/mlp/gate_up_proj")
            gate, up = w.node("Split", [gate_up], f"{p}/mlp/Split", outputs=2, axis=-1, num_outputs=2)
            sig = w.node("Sigmoid", [gate], f"{p}/mlp/act_fn/Sigmoid")[0]
            act = w.node("Mul", [gate, sig], f"{p}/mlp/act_fn/Mul")[0]
            prod = w.node("Mul", [act, up], f"{p}/mlp/Mul")[0]
            x = w.linear(prod, [(f"{hf}.mlp.down_proj", mlp.down_proj)], f"{p}/mlp/down_proj")
        idx = w.init("last_index", np.array([-1], dtype=np.int64))
        x_last = w.node("Gather", [x, idx], "/model/norm/Gather", axis=1)[0]
        r_last = w.node("Gather", [residual, idx], "/model/norm/Gather_1", axis=1)[0]
        norm_w = w.init("model.norm.weight", llm.model.norm.weight.detach().float().numpy())
        final = w.node("SkipSimplifiedLayerNormalization", [x_last, r_last, norm_w], "/model/norm/SkipLayerNorm",
                       outputs=1, domain="com.microsoft", epsilon=eps)[0]
        head = w.linear(final, [("lm_head", llm.lm_head)], "/lm_head")
        if float16:
            w.nodes.append(helper.make_node("Cast", [head], ["logits"], name="/lm_head/Cast", to=TensorProto.FLOAT))
        else:
            w.nodes.append(helper.make_node("Identity", [head], ["logits"], name="/lm_head/Identity"))
    finally:
        data.close()

    f32 = TensorProto.FLOAT
    kv_in = [helper.make_tensor_value_info(f"past_{k}_{i}", float_type, ["batch", kv_heads, "past", head_dim])
             for i in range(len(llm.model.layers)) for k in ("key", "value")]
    kv_out = [helper.make_tensor_value_info(f"present_{k}_{i}", float_type, ["batch", kv_heads, "total", head_dim])
              for i in range(len(llm.model.layers)) for k in ("key", "value")]
    vocab = llm.lm_head.weight.shape[0]
    graph = helper.make_graph(
        w.nodes, "salmonn_decoder",
        [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", cfg.hidden_size]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]), *kv_in],
        [helper.make_tensor_value_info("logits", f32, ["batch", 1, vocab]), *kv_out],
        initializer=w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="salmonn-export")
    model.ir_version = 10
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)
    return DecoderGraphInfo(max_positions=positions, matmul_nbits=w.nbits, nodes=len(w.nodes))


def switch_accuracy_level(path: Path, spec, level: int, min_cosine: float, seed: int = 1) -> dict:
    """Set every MatMulNBits of the validated decoder `path` to `accuracy_level` `level` (the proto only:
    weights and codes stay as validated) and run both versions in ONNX Runtime on the spec's first
    fresh input. Returns the cosine and max relative error of the logits against the previous level.
    Raises SalmonnError when the new logits are not finite or their cosine is below `min_cosine`."""
    from salmonn_export.export.onnx_export import compare, session

    gen = torch.Generator().manual_seed(seed)
    args = spec.fresh(gen)[0]
    graph_inputs = onnx.load(str(path), load_external_data=False).graph.input
    dtypes = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph_inputs}
    feeds = {name: a.numpy().astype(dtypes[name]) for name, a in zip(spec.input_names, args)}
    before = session(path).run(["logits"], feeds)[0]
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)
    after = session(path).run(["logits"], feeds)[0]
    stats = compare(before, after)
    cosine = stats["cosine"]
    check = {"accuracy_level": level, "cosine_vs_fp32_compute": cosine, "max_rel_vs_fp32_compute": stats["max_rel"],
             "min_cosine": min_cosine}
    if not np.isfinite(after).all() or cosine < min_cosine:
        raise SalmonnError(f"decoder at accuracy_level {level} gives logits far from its fp32-compute version "
                           f"(cosine {cosine:.4f}, limit {min_cosine}): the int8-activation kernel is broken here", path)
    return check
