"""The speech side of a torch bundle: the reference's own Whisper encoder, BEATs and Q-Former
modules, rebuilt from the manifest's configs and `encoders.safetensors` (keys as in the SALMONN
state dict), with the reference's batching, fusion and windowing (model/salmonn.py, spec 2.1–2.7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from salmonn_export.errors import SalmonnError
from salmonn_export.model.beats import BEATs, BEATsConfig
from salmonn_export.model.qformer import BERT_HIDDEN, SpeechQFormer, qformer_windows
from salmonn_export.model.weights import load_strict
from salmonn_export.model.whisper import load_feature_extractor, whisper_features


class SpeechEncoders(nn.Module):
    """waves → speech embeddings [B, windows·queries, H]; attribute names are the SALMONN's."""

    def __init__(self, whisper_config: dict, beats_config: dict | None, proj_shape: tuple[int, int], num_query_tokens: int,
                 window: int, stride: int):
        super().__init__()
        wcfg = WhisperConfig.from_dict(whisper_config)
        wcfg._attn_implementation = "eager"  # as the reference (model/whisper.py)
        self.speech_encoder = WhisperEncoder(wcfg)
        self.ln_speech = nn.LayerNorm(wcfg.d_model)
        width = wcfg.d_model
        self.beats = None
        if beats_config is not None:
            self.beats = BEATs(BEATsConfig.from_dict(beats_config))
            self.ln_audio = nn.LayerNorm(self.beats.cfg.encoder_embed_dim)
            width += self.beats.cfg.encoder_embed_dim
        self.speech_Qformer = SpeechQFormer(width)
        self.speech_query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, BERT_HIDDEN))
        self.speech_llama_proj = nn.Linear(proj_shape[1], proj_shape[0])
        self.window, self.stride = window, stride
        self.feature_extractor = None
        self._whisper, self._beats, self._qformer = self.encode_whisper, self.encode_beats, self.qformer_project

    @classmethod
    def from_bundle(cls, bundle: Path, spec: dict, qformer: dict, device: torch.device) -> SpeechEncoders:
        """Build from a torch bundle's manifest section; fp32 weights on `device`."""
        path = bundle / spec["encoders"]
        try:
            state = load_file(str(path))
        except (OSError, ValueError) as exc:
            raise SalmonnError(f"unreadable safetensors ({exc})", path) from None
        if "speech_llama_proj.weight" not in state:
            raise SalmonnError("encoders.safetensors has no speech_llama_proj.weight", path)
        module = cls(spec["whisper_config"], spec["beats_config"], tuple(state["speech_llama_proj.weight"].shape),
                     spec["num_query_tokens"], qformer["window"], qformer["stride"])
        load_strict(module, state, path, "torch bundle encoders")
        module.feature_extractor = load_feature_extractor(bundle / spec["whisper_preprocessor"])
        return module.eval().to(device)

    def compile(self) -> None:
        """torch.compile the Whisper encoder and the Q-Former (BEATs keeps its data-dependent masks eager)."""
        self._whisper = torch.compile(self.encode_whisper)
        self._qformer = torch.compile(self.qformer_project)

    @property
    def device(self) -> torch.device:
        return self.speech_query_tokens.device

    def batch(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The evaluator's collate: stacked log-mels [B, n_mels, 3000] fp32, zero-padded float64 waves
        [B, N], padding mask [B, N] (True at padding)."""
        spectrogram = torch.stack([whisper_features(self.feature_extractor, w) for w in waves])
        lengths = torch.tensor([len(w) for w in waves])
        raw = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(np.asarray(w)) for w in waves], batch_first=True)
        mask = torch.arange(raw.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)
        return spectrogram.to(self.device), raw.to(self.device), mask.to(self.device)

    def encode_whisper(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.speech_encoder(spectrogram).last_hidden_state

    def encode_beats(self, raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.beats.extract_features(raw, mask)

    def qformer_project(self, whisper_hidden: torch.Tensor, beats_features: torch.Tensor | None) -> torch.Tensor:
        """ln_speech/ln_audio, zero-pad the shorter in time, concat, windows, Q-Former, projection."""
        speech = self.ln_speech(whisper_hidden)
        if beats_features is not None:
            audio = self.ln_audio(beats_features)
            if audio.size(1) < speech.size(1):
                audio = F.pad(audio, (0, 0, 0, speech.size(1) - audio.size(1)))
            elif audio.size(1) > speech.size(1):
                speech = F.pad(speech, (0, 0, 0, audio.size(1) - speech.size(1)))
            speech = torch.cat((speech, audio), dim=-1)
        B = speech.shape[0]
        windows = qformer_windows(speech, self.window, self.stride)
        queries = self.speech_query_tokens.expand(windows.shape[0], -1, -1)
        out = self.speech_llama_proj(self.speech_Qformer.bert(queries, windows))
        return out.view(B, -1, out.size(2)).contiguous()

    def forward(self, waves: list[np.ndarray]) -> torch.Tensor:
        return self.encode(*self.batch(waves))

    def encode(self, spectrogram: torch.Tensor, raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """From a built batch (`batch`): Whisper, BEATs, Q-Former + projection → [B, 88, H]."""
        hidden = self._whisper(spectrogram)
        beats = self._beats(raw, mask) if self.beats is not None else None
        return self._qformer(hidden, beats)
