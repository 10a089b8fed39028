"""The fused decoder graph (GroupQueryAttention) vs PyTorch, and the runtime's shared KV cache."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from salmonn_export.export.decoder_graph import build_decoder_graph
from salmonn_export.export.onnx_export import check_model, session, validate_component
from salmonn_export.export.specs import decoder_spec
from salmonn_export.recipes import WeightQuant
from salmonn_export.runtime.generation import positions_from_mask
from salmonn_export.runtime.kv_cache import KVCache, prefill
from salmonn_export.transforms.quantize import quantize_model

LLAMA32 = dict(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}, tie_word_embeddings=True)


def tiny_llm(**extra) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0, **extra)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("extra", [{}, LLAMA32], ids=["llama", "llama3-rope-tied"])
def test_graph_matches_pytorch_on_prompts_steps_and_padding(tmp_path, extra):
    llm = tiny_llm(**extra)
    path = tmp_path / "decoder.onnx"
    info = build_decoder_graph(llm, path)
    check_model(path)
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Transpose" not in ops and info.matmul_nbits == 0
    result = validate_component(decoder_spec(llm, 0.02), path)
    assert result["passed"] and result["max_rel"] < 1e-5, result


def test_int4_lm_head_and_layers_become_matmul_nbits_from_the_codes(tmp_path):
    llm = tiny_llm(**LLAMA32)
    layers = quantize_model(llm, WeightQuant(bits=4, group_size=32, method="rtn"), ("embed_tokens",), None).layers
    assert "lm_head" in layers
    path = tmp_path / "decoder.onnx"
    assert build_decoder_graph(llm, path, layers).matmul_nbits == 2 * 4 + 1
    result = validate_component(decoder_spec(llm, 0.02), path)  # torch side holds the dequantized codes
    assert result["passed"], result


def test_kv_cache_reorders_in_place_and_expands_like_fancy_indexing(tmp_path):
    llm = tiny_llm()
    path = tmp_path / "decoder.onnx"
    build_decoder_graph(llm, path)
    sess = session(path)
    outs = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    cache = KVCache(sess, outs, 1, 24, 2, 2, 16, 300)
    embeds = rng.standard_normal((1, 9, 128)).astype(np.float32)
    mask = np.ones((1, 9), dtype=np.int64)
    logits = prefill(cache, embeds, mask, positions_from_mask(mask))
    wide = cache.reorder(np.zeros(4, dtype=np.int64))
    assert wide.batch == 4 and wide.length == 9
    for a in wide.arrays:
        a[:, :, :9] = rng.standard_normal(a[:, :, :9].shape)
    for indices in ([1, 0, 0, 2], [3, 3, 3, 3], [0, 1, 2, 3], [2, 0, 3, 1]):
        expected = [a[np.array(indices), :, :9].copy() for a in wide.arrays]
        wide = wide.reorder(np.array(indices))
        for a, e in zip(wide.arrays, expected):
            np.testing.assert_array_equal(a[:, :, :9], e)
    # a step on the expanded cache equals the batch-1 step on every row with the same history
    one = cache.run(embeds[:, :1], np.ones((1, 10), np.int64), np.array([[9]]))[:, -1].copy()
    same = KVCache(sess, outs, 1, 24, 2, 2, 16, 300)
    prefill(same, embeds, mask, positions_from_mask(mask))
    four = same.reorder(np.zeros(4, dtype=np.int64)).run(np.repeat(embeds[:, :1], 4, 0), np.ones((4, 10), np.int64),
                                                         np.full((4, 1), 9))
    np.testing.assert_allclose(four[:, -1], np.repeat(one, 4, 0), rtol=0, atol=1e-5)
    assert logits.shape == (1, 1, 300)
