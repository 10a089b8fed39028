"""The SALMONN reference: assembly from a challenge config, encode, prompt wrap and generate.

Attribute names mirror the challenge's `SALMONN` class so `state_dict()` keys are the
checkpoint's keys. Loading is strict where the challenge is silent (spec 8.7): every tensor of
the training `.pth` must land somewhere, and every trainable tensor must be present.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from salmonn_export.audio import load_audio
from salmonn_export.errors import SalmonnError
from salmonn_export.model.beats import load_beats
from salmonn_export.model.config import SalmonnConfig, check_generate, load_config
from salmonn_export.model.llm import (
    BNB_SUFFIXES,
    apply_lora,
    compute_layers_in_fp32,
    consume_tied_lm_head,
    load_base_llm,
    load_tokenizer,
    resize_with_mean_rows,
)
from salmonn_export.model.prompts import SPEECH_PLACEHOLDER, config_prompts
from salmonn_export.model.qformer import BERT_HIDDEN, SpeechQFormer, num_windows, qformer_windows, window_size
from salmonn_export.model.weights import torch_load
from salmonn_export.model.whisper import load_feature_extractor, load_whisper_encoder, whisper_features
from salmonn_export.tasks import templated_prompt

BEATS_SHARED_BIAS = "beats.encoder.layers.{}.self_attn.relative_attention_bias.weight"


@dataclass
class Batch:
    """What the challenge's collate builds: stacked spectrograms, zero-padded float64 waves, mask."""

    spectrogram: torch.Tensor  # [B, n_mels, 3000] fp32
    raw_wav: torch.Tensor  # [B, N] fp64
    padding_mask: torch.Tensor  # [B, N] bool, True at padding
    tasks: list[str]


class SALMONN(nn.Module):
    def __init__(self, config: SalmonnConfig, device: str = "cpu", low_memory: bool = False):
        """`low_memory` (CPU, for `build`): LLM decoder layers stored in their checkpoint's half precision and
        computed in fp32 one layer at a time (`compute_layers_in_fp32`): same outputs, half the memory."""
        super().__init__()
        m = config.model
        self.config = config
        self.device_name = device
        self.speech_encoder = load_whisper_encoder(config.resolve(m.whisper_path))
        self.feature_extractor = load_feature_extractor(config.resolve(m.whisper_path))
        whisper_width = self.speech_encoder.config.d_model
        self.ln_speech = nn.LayerNorm(whisper_width)
        self.beats = None
        encoder_width = whisper_width
        if m.beats_path:
            self.beats = load_beats(config.resolve(m.beats_path))
            beats_width = self.beats.cfg.encoder_embed_dim
            self.ln_audio = nn.LayerNorm(beats_width)
            encoder_width += beats_width
        self.speech_Qformer = SpeechQFormer(encoder_width)
        self.speech_query_tokens = nn.Parameter(torch.zeros(1, m.num_speech_query_token, BERT_HIDDEN))
        self.llama_tokenizer = load_tokenizer(config.resolve(m.llama_path))
        low_memory = low_memory and torch.device(device).type == "cpu"
        base = load_base_llm(config.resolve(m.llama_path), keep_stored_dtype=low_memory)
        if torch.device(device).type == "cuda":
            base = base.half()  # the challenge loads the LLM with torch_dtype=float16; peft keeps LoRA in fp32
        self.base_vocab_size = base.get_input_embeddings().weight.shape[0]
        resize_with_mean_rows(base, len(self.llama_tokenizer))
        self.speech_llama_proj = nn.Linear(BERT_HIDDEN, base.config.hidden_size)
        self.llama_model = apply_lora(base, m.lora_rank, m.lora_alpha, m.lora_dropout) if m.lora else base
        if low_memory:
            for module in base.modules():
                if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                    module.base_layer.float()  # adapted Linears in fp32, so a LoRA merge happens in fp32
            compute_layers_in_fp32(base)
        self.window = window_size(m.second_per_window)
        self.stride = window_size(m.second_stride)
        self.test_prompts = config_prompts(config)
        self.load_report = self._load_training_checkpoint()
        self.eval()
        self.to(device)

    @property
    def speech_tokens(self) -> int:
        """Speech embeddings per clip: windows over Whisper's 1500 frames × queries per window (88 in the challenge's config)."""
        return num_windows(1500, self.window, self.stride) * self.speech_query_tokens.shape[1]

    # ------------------------------------------------------------------ loading

    @property
    def causal_lm(self) -> nn.Module:
        """The inner LlamaForCausalLM (with LoRA layers injected when lora is on): `llama_model.model`."""
        return self.llama_model.base_model.model if self.config.model.lora else self.llama_model

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.get_input_embeddings()(ids)

    def trainable_keys(self) -> list[str]:
        """Keys the training `.pth` must provide: what the challenge trains (spec 1.4)."""
        keys = []
        for name in self.state_dict():
            if name.startswith(("ln_speech.", "ln_audio.", "speech_Qformer.", "speech_llama_proj.")):
                keys.append(name)
            elif name == "speech_query_tokens":
                keys.append(name)
            elif name.startswith("llama_model.") and (".lora_A." in name or ".lora_B." in name):
                keys.append(name)
        return keys

    def _load_training_checkpoint(self) -> dict:
        m = self.config.model
        own = self.state_dict()
        expected = set(self.trainable_keys())
        provided: dict[str, torch.Tensor] = {}
        sources: dict[str, Path] = {}
        for field_name in ("speech_llama_proj_model", "ckpt"):
            value = getattr(m, field_name)
            if not value:
                continue
            path = self.config.resolve(value)
            ckpt = torch_load(path, "training checkpoint")
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
                raise SalmonnError("not a SALMONN training checkpoint (no `model` state dict)", path)
            for k, v in ckpt["model"].items():
                provided[k] = v
                sources[k] = path
        if not provided:
            raise SalmonnError("`model.ckpt` is empty: a trained SALMONN needs its training checkpoint", self.config.path)
        ignored_bnb = [k for k in provided if k.startswith("llama_model.") and k.endswith(BNB_SUFFIXES)]
        shared_bias = {}
        if self.beats is not None:
            for i in range(1, self.beats.cfg.encoder_layers):
                key = BEATS_SHARED_BIAS.format(i)
                if key in provided:
                    shared_bias[key] = provided[key]
        lm = self.causal_lm
        tied = lm.get_output_embeddings() is not None and lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        tied_head = {k: v for k, v in provided.items() if tied and k.startswith("llama_model.") and k in own
                     and k.endswith("lm_head.weight")}
        leftovers = sorted(set(provided) - expected - set(ignored_bnb) - set(shared_bias) - set(tied_head))
        missing = sorted(expected - set(provided))
        path = next(iter(sources.values()))
        if leftovers:
            raise SalmonnError(f"checkpoint holds tensors this model has no place for: {_few(leftovers)}", path)
        if missing:
            raise SalmonnError(f"checkpoint lacks trained tensors: {_few(missing)}", path)
        bad = [k for k in expected if tuple(provided[k].shape) != tuple(own[k].shape)]
        if bad:
            detail = ", ".join(f"{k} {tuple(provided[k].shape)} vs model {tuple(own[k].shape)}" for k in sorted(bad)[:3])
            raise SalmonnError(f"checkpoint does not match the config's models: {detail}", sources[bad[0]])
        with torch.no_grad():
            for k in expected:
                own[k].copy_(provided[k].to(own[k].dtype))
            for k, v in shared_bias.items():
                # The challenge's strict=False load writes this into the table all layers share.
                table = self.beats.encoder.layers[0].self_attn.relative_attention_bias.weight
                if tuple(v.shape) != tuple(table.shape):
                    raise SalmonnError(f"`{k}` has shape {tuple(v.shape)}, BEATs table is {tuple(table.shape)}", path)
                table.copy_(v)
        for k, v in tied_head.items():
            consume_tied_lm_head(lm, v, self.base_vocab_size, k, sources[k])
        return {"loaded": len(expected), "ignored_bnb_quant_state": len(ignored_bnb),
                "beats_shared_bias": len(shared_bias), "tied_lm_head": len(tied_head),
                "files": sorted({str(p) for p in sources.values()})}

    # ------------------------------------------------------------------ inputs

    def make_batch(self, waves: list[np.ndarray], tasks: list[str]) -> Batch:
        """The evaluator's collate over already-loaded 16 kHz clips."""
        spectrogram = torch.stack([whisper_features(self.feature_extractor, w) for w in waves])
        lengths = torch.tensor([len(w) for w in waves])
        raw_wav = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True, padding_value=0)
        padding_mask = torch.arange(raw_wav.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)
        return Batch(spectrogram, raw_wav, padding_mask, list(tasks))

    def _autocast(self):
        if torch.device(self.device_name).type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ forward

    def encode_whisper(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.speech_encoder(spectrogram.to(self.device_name)).last_hidden_state

    def encode_beats(self, raw_wav: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.beats.extract_features(raw_wav.to(self.device_name), padding_mask.to(self.device_name))

    def fuse(self, whisper_hidden: torch.Tensor, beats_features: torch.Tensor | None) -> torch.Tensor:
        """ln_speech / ln_audio, zero-pad the shorter one in time, concat on channels."""
        speech = self.ln_speech(whisper_hidden)
        if beats_features is None:
            return speech
        audio = self.ln_audio(beats_features)
        if audio.size(1) < speech.size(1):
            audio = F.pad(audio, (0, 0, 0, speech.size(1) - audio.size(1)))
        elif audio.size(1) > speech.size(1):
            speech = F.pad(speech, (0, 0, 0, audio.size(1) - speech.size(1)))
        return torch.cat((speech, audio), dim=-1)

    def qformer_project(self, fused: torch.Tensor) -> torch.Tensor:
        """Windowed Q-Former + projection: [B, T, C] → [B, windows·queries, LLM hidden]."""
        B = fused.shape[0]
        windows = qformer_windows(fused, self.window, self.stride)
        queries = self.speech_query_tokens.expand(windows.shape[0], -1, -1)
        out = self.speech_Qformer.bert(queries, windows)
        out = self.speech_llama_proj(out)
        return out.view(B, -1, out.size(2)).contiguous()

    @torch.inference_mode()
    def encode_speech(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            whisper_hidden = self.encode_whisper(batch.spectrogram)
            beats_features = self.encode_beats(batch.raw_wav, batch.padding_mask) if self.beats is not None else None
            return self.qformer_project(self.fuse(whisper_hidden, beats_features))

    def prompts_for(self, tasks: list[str]) -> list[str]:
        return [templated_prompt(self.test_prompts, t, self.config.model.prompt_template) for t in tasks]

    @torch.inference_mode()
    def prompt_wrap(self, speech_embeds: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """BOS + emb(p_before) + speech + emb(p_after, right-padded with [PAD]) and the mask (spec 3)."""
        tok = self.llama_tokenizer
        device = speech_embeds.device
        befores, afters = zip(*(p.split(SPEECH_PLACEHOLDER) for p in prompts))
        before = tok(list(befores), return_tensors="pt", add_special_tokens=False).to(device)
        after = tok(list(afters), return_tensors="pt", padding="longest", add_special_tokens=False).to(device)
        speech_atts = torch.ones(speech_embeds.shape[:-1], dtype=torch.long, device=device)
        embeds = torch.cat([self.embed_tokens(before.input_ids), speech_embeds, self.embed_tokens(after.input_ids)], dim=1)
        atts = torch.cat([before.attention_mask, speech_atts, after.attention_mask], dim=1)
        B = speech_embeds.shape[0]
        bos = torch.ones([B, 1], dtype=torch.int32, device=device) * tok.bos_token_id
        embeds = torch.cat([self.embed_tokens(bos), embeds], dim=1)
        atts = torch.cat([atts[:, :1], atts], dim=1)
        return embeds, atts

    def generation_kwargs(self, **overrides) -> dict:
        """transformers `generate` kwargs: the config's `generate:` values with non-None overrides
        applied (range-checked like the config: SalmonnError)."""
        check_generate(overrides, overrides=True)
        g = self.config.generate
        kwargs = dict(
            max_new_tokens=g.max_new_tokens, num_beams=g.num_beams, do_sample=g.do_sample, min_length=g.min_length,
            temperature=g.temperature, top_p=g.top_p, repetition_penalty=g.repetition_penalty,
            length_penalty=g.length_penalty, pad_token_id=self.causal_lm.config.eos_token_id,
        )
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return kwargs

    @torch.inference_mode()
    def generate_ids(self, embeds: torch.Tensor, atts: torch.Tensor, **overrides) -> torch.Tensor:
        with self._autocast(), _positions_from_attention_mask(self.causal_lm):
            return self.causal_lm.generate(inputs_embeds=embeds, attention_mask=atts, **self.generation_kwargs(**overrides))

    def decode(self, ids: torch.Tensor) -> list[str]:
        """batch_decode with default flags (specials kept), split on end_sym, lowercase, no strip."""
        end_sym = self.config.generate.end_sym
        return [t.split(end_sym)[0].lower() for t in self.llama_tokenizer.batch_decode(ids)]

    def generate_batch(self, batch: Batch, **overrides) -> tuple[list[str], torch.Tensor]:
        speech = self.encode_speech(batch)
        embeds, atts = self.prompt_wrap(speech, self.prompts_for(batch.tasks))
        ids = self.generate_ids(embeds, atts, **overrides)
        return self.decode(ids), speech

    def transcribe(self, audio_paths: list[str | Path], task: str | list[str], batch_size: int = 1,
                   **overrides) -> list[str]:
        """Load, batch (in order) and generate; one text per file."""
        tasks = [task] * len(audio_paths) if isinstance(task, str) else list(task)
        texts: list[str] = []
        for start in range(0, len(audio_paths), batch_size):
            paths = audio_paths[start:start + batch_size]
            waves = [load_audio(p) for p in paths]
            out, _ = self.generate_batch(self.make_batch(waves, tasks[start:start + batch_size]), **overrides)
            texts.extend(out)
        return texts


@contextlib.contextmanager
def _positions_from_attention_mask(lm: nn.Module):
    """Position ids as transformers 4.46 (the challenge's version) made them during `generate`:
    cumsum(attention_mask) − 1, with 1 at masked slots. transformers 5 counts positions with
    arange instead, which differs for right-padded prompts (mixed-task batches, spec 8.4)."""
    original = lm.prepare_inputs_for_generation

    def prepare(input_ids, next_sequence_length=None, cache=None, attention_mask=None, inputs_embeds=None,
                is_first_iteration=False, **kwargs):
        inputs = original(input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
                          inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)
        if attention_mask is not None:
            positions = attention_mask.long().cumsum(-1) - 1
            positions.masked_fill_(attention_mask == 0, 1)
            tensor = inputs.get("inputs_embeds")
            length = tensor.shape[1] if tensor is not None else inputs["input_ids"].shape[1]
            inputs["position_ids"] = positions[:, -length:]
        return inputs

    lm.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        del lm.prepare_inputs_for_generation


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_salmonn(config: str | Path | SalmonnConfig, device: str = "cpu", overrides: list[str] | None = None,
                 low_memory: bool = False) -> SALMONN:
    """Load a trained SALMONN from its challenge YAML (`low_memory`: see `SALMONN.__init__`)."""
    if not isinstance(config, SalmonnConfig):
        config = load_config(config, overrides)
    torch.manual_seed(0)  # peft initialises LoRA before the checkpoint overwrites it; keep that deterministic
    return SALMONN(config, device=device, low_memory=low_memory)
