"""One small spec per exported sub-model: its wrapper, inputs, outputs, dynamic axes, dummy and
fresh validation inputs, and tolerance. `onnx_export.export_component` consumes any of them.

Graph boundaries (DESIGN.md): the numpy runtime computes Whisper log-mels and the BEATs fbank
and masks; the graphs take those. `ln_speech`/`ln_audio`, the zero padding, concatenation and
windowing live in the Q-Former graph. The decoder takes `inputs_embeds` + KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from salmonn_export.model.salmonn import SALMONN

WHISPER_FRAMES = 3000


@dataclass
class ExportSpec:
    name: str
    filename: str
    wrapper: nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    dummy: Callable[[torch.Generator], tuple]
    fresh: Callable[[torch.Generator], list[tuple]]
    max_rel_err: float = 1e-4
    min_cosine: float = 0.99999


class WhisperEncoderGraph(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features):
        return self.encoder(input_features).last_hidden_state


class BEATsGraph(nn.Module):
    def __init__(self, beats):
        super().__init__()
        self.beats = beats

    def forward(self, fbank, padding_mask):
        return self.beats.forward_fbank(fbank, padding_mask)


class QFormerGraph(nn.Module):
    """ln_speech / ln_audio → zero-pad → concat → 17-frame windows → Q-Former → projection."""

    def __init__(self, salmonn: SALMONN):
        super().__init__()
        self.salmonn = salmonn

    def forward(self, whisper_hidden, beats_features=None):
        return self.salmonn.qformer_project(self.salmonn.fuse(whisper_hidden, beats_features))


class DecoderGraph(nn.Module):
    """Merged LLM with an explicit KV cache: past_key/value_{i} in, present_key/value_{i} out,
    logits of the last position only ([B, 1, V]: generation reads no other row, and a 128k-vocab
    head over the whole prompt would dominate prefill). The PyTorch side of the fused decoder
    graph (`decoder_graph.build_decoder_graph`)."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm
        self.num_layers = llm.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.llm.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits[:, -1:], *presents)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def whisper_spec(salmonn: SALMONN) -> ExportSpec:
    mels = salmonn.speech_encoder.config.num_mel_bins
    return ExportSpec(
        name="whisper_encoder", filename="whisper_encoder.onnx",
        wrapper=WhisperEncoderGraph(salmonn.speech_encoder).eval(),
        input_names=["input_features"], output_names=["last_hidden_state"],
        dynamic_axes={"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}},
        dummy=lambda g: (_randn(g, 1, mels, WHISPER_FRAMES, scale=0.5),),
        fresh=lambda g: [(_randn(g, 2, mels, WHISPER_FRAMES, scale=0.5),), (_randn(g, 1, mels, WHISPER_FRAMES),)],
    )


def beats_spec(salmonn: SALMONN) -> ExportSpec:
    beats = salmonn.beats

    def inputs(g, batch, frames, pad_tokens=0):
        fbank = _randn(g, batch, frames, 128, scale=0.5)
        tokens = beats.token_count(frames)
        mask = torch.zeros(batch, tokens, dtype=torch.bool)
        if pad_tokens:
            mask[-1, tokens - pad_tokens:] = True
        return fbank, mask

    return ExportSpec(
        name="beats", filename="beats.onnx", wrapper=BEATsGraph(beats).eval(),
        input_names=["fbank", "padding_mask"], output_names=["features"],
        dynamic_axes={"fbank": {0: "batch", 1: "frames"}, "padding_mask": {0: "batch", 1: "tokens"},
                      "features": {0: "batch", 1: "tokens"}},
        dummy=lambda g: inputs(g, 1, 198),
        fresh=lambda g: [inputs(g, 1, 998), inputs(g, 2, 430, pad_tokens=40), inputs(g, 1, 98)],
    )


def qformer_spec(salmonn: SALMONN) -> ExportSpec:
    dw = salmonn.speech_encoder.config.d_model
    has_beats = salmonn.beats is not None
    db = salmonn.beats.cfg.encoder_embed_dim if has_beats else 0

    def inputs(g, batch, tokens):
        hidden = _randn(g, batch, 1500, dw)
        return (hidden, _randn(g, batch, tokens, db)) if has_beats else (hidden,)

    names = ["whisper_hidden", "beats_features"] if has_beats else ["whisper_hidden"]
    axes = {"whisper_hidden": {0: "batch"}, "speech_embeds": {0: "batch"}}
    if has_beats:
        axes["beats_features"] = {0: "batch", 1: "tokens"}
    return ExportSpec(
        name="qformer", filename="qformer.onnx", wrapper=QFormerGraph(salmonn).eval(),
        input_names=names, output_names=["speech_embeds"], dynamic_axes=axes,
        dummy=lambda g: inputs(g, 1, 96),
        fresh=lambda g: [inputs(g, 1, 496), inputs(g, 2, 1496), inputs(g, 3, 48)],
    )


def decoder_spec(llm: nn.Module, embed_scale: float) -> ExportSpec:
    cfg = llm.config
    layers = cfg.num_hidden_layers
    kv = cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    past_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]

    def inputs(g, batch, seq, past, left_pad=0, right_pad=0):
        embeds = _randn(g, batch, seq, cfg.hidden_size, scale=embed_scale)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        if left_pad:
            mask[0, :left_pad] = 0
        if right_pad:  # a shorter prompt in a batch (prompt_wrap pads on the right), then decoding after it
            mask[-1, past + seq - right_pad - 1:past + seq - 1] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        kvs = tuple(_randn(g, batch, kv, past, hd) for _ in range(2 * layers))
        return (embeds, mask, positions, *kvs)

    axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for n in past_names:
        axes[n] = {0: "batch", 2: "past"}
    for n in present_names:
        axes[n] = {0: "batch", 2: "total"}
    return ExportSpec(
        name="decoder", filename="decoder.onnx", wrapper=DecoderGraph(llm).eval(),
        input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
        output_names=["logits", *present_names], dynamic_axes=axes,
        dummy=lambda g: inputs(g, 2, 5, 3),
        # GroupQueryAttention's limits (the runtime keeps to them): a first prompt is rotated at
        # positions 0..S-1 whatever position_ids say, so it must be free of padding; several new
        # tokens after a past only at batch 1. A padded prompt row is prefilled at batch 1 as its
        # tokens, then its padded tail as a second chunk (the last case here).
        fresh=lambda g: [inputs(g, 1, 97, 0), inputs(g, 3, 1, 11), inputs(g, 2, 1, 7, left_pad=2),
                         inputs(g, 2, 1, 7, right_pad=2), inputs(g, 1, 4, 7, right_pad=2)],
    )
