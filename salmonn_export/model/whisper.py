"""Whisper: the encoder of an HF Whisper folder (any size) and its feature extractor.

Only `.encoder` is kept, as in SALMONN. Eager attention, because the challenge's repo-local
Whisper copy computes attention explicitly (spec 2.1); sdpa differs in the last bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from salmonn_export.errors import SalmonnError
from salmonn_export.model.weights import load_strict, read_hf_state_dict

ENCODER_PREFIXES = ("model.encoder.", "encoder.")


def load_whisper_config(folder: Path) -> WhisperConfig:
    if not (folder / "config.json").is_file():
        raise SalmonnError("Whisper folder has no config.json (no model hub access: give a local folder)", folder)
    try:
        config = WhisperConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise SalmonnError(f"bad Whisper config ({str(exc).splitlines()[0][:160]})", folder / "config.json") from None
    config._attn_implementation = "eager"
    return config


def load_whisper_encoder(folder: str | Path) -> WhisperEncoder:
    """Build the encoder from config.json and load exactly its weights from the folder."""
    folder = Path(folder)
    config = load_whisper_config(folder)
    state = read_hf_state_dict(folder, "Whisper")
    encoder_state = {}
    for prefix in ENCODER_PREFIXES:
        encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if encoder_state:
            break
    if not encoder_state:
        raise SalmonnError("no Whisper encoder weights (keys `encoder.*` or `model.encoder.*`) in this folder", folder)
    encoder = WhisperEncoder(config)
    load_strict(encoder, encoder_state, folder, "Whisper encoder")
    return encoder.eval()


def load_feature_extractor(folder: str | Path) -> WhisperFeatureExtractor:
    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise SalmonnError("Whisper folder has no preprocessor_config.json", folder)
    return WhisperFeatureExtractor.from_pretrained(str(folder))


def whisper_features(extractor: WhisperFeatureExtractor, wave: np.ndarray) -> torch.Tensor:
    """Log-mel [n_mels, 3000] for one 16 kHz clip, exactly as evaluate_salmonn calls the extractor."""
    feats = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_features"]
    return feats.squeeze(0)
