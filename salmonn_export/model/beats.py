"""BEATs, written cleanly, with parameter names that match the released `.pt` files.

The numbers follow the original module step by step (spec 2.3): Kaldi fbank in float64 on
wave·2^15, patch embedding, deep-norm post-LN encoder with gated T5-style relative position
bias, q·d^-0.5/32 attention with the (scores − rowmax)·32 trick, and the odd reshape-and-`all`
padding-mask downsampling. The fbank is implemented here (no torchaudio dependency) following
`torchaudio.compliance.kaldi.fbank` with the options BEATs uses, including its float32 mel banks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from salmonn_export.errors import SalmonnError
from salmonn_export.model.weights import load_strict, torch_load

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582


@dataclass
class BEATsConfig:
    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> BEATsConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known})


# ---------------------------------------------------------------- Kaldi fbank (torchaudio-exact)

def _mel(freq):
    return 1127.0 * torch.log(1.0 + freq / 700.0)


def kaldi_mel_banks(num_bins: int = 128, padded_window: int = 512, sample_freq: float = 16000.0,
                    low_freq: float = 20.0) -> torch.Tensor:
    """Triangular mel banks [num_bins, padded_window//2 + 1], computed in float32 like torchaudio."""
    num_fft_bins = padded_window // 2
    high_freq = 0.5 * sample_freq
    fft_bin_width = sample_freq / padded_window
    mel_low = 1127.0 * math.log(1.0 + low_freq / 700.0)
    mel_high = 1127.0 * math.log(1.0 + high_freq / 700.0)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel(fft_bin_width * torch.arange(float(num_fft_bins))).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return F.pad(banks, (0, 1))


def povey_window(dtype=torch.float64, device=None) -> torch.Tensor:
    return torch.hann_window(400, periodic=False, dtype=dtype, device=device).pow(0.85)


def kaldi_fbank(wave: torch.Tensor, num_mel_bins: int = 128) -> torch.Tensor:
    """`torchaudio.compliance.kaldi.fbank(wave[None], num_mel_bins, 16 kHz, 25 ms, 10 ms)` for a 1-D wave.

    Defaults that matter: povey window, dither 0, preemphasis 0.97, DC removal, snip_edges,
    power spectrum, 512-point FFT, log with float32-epsilon floor. Runs in the wave's dtype.
    """
    window_size, window_shift, padded = 400, 160, 512
    dtype = wave.dtype
    if wave.shape[0] < window_size:
        return torch.empty(0, num_mel_bins, dtype=dtype)
    frames = 1 + (wave.shape[0] - window_size) // window_shift
    strided = wave.as_strided((frames, window_size), (window_shift * wave.stride(0), wave.stride(0)))
    strided = strided - strided.mean(dim=1, keepdim=True)
    shifted = F.pad(strided.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
    strided = strided - 0.97 * shifted[:, :-1]
    window = povey_window(dtype, wave.device).unsqueeze(0)
    strided = F.pad(strided * window, (0, padded - window_size))
    spectrum = torch.fft.rfft(strided).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins, padded).to(device=wave.device, dtype=dtype)
    energies = torch.mm(spectrum, banks.T)
    eps = torch.tensor(torch.finfo(torch.float).eps).to(device=wave.device, dtype=dtype)
    return torch.max(energies, eps).log()


def beats_fbank(raw_wav: torch.Tensor) -> torch.Tensor:
    """BEATs.preprocess: per-clip fbank of wave·2^15, normalised, in the input dtype (float64)."""
    fbanks = [kaldi_fbank(w * 2**15) for w in raw_wav]
    fbank = torch.stack(fbanks, dim=0)
    return (fbank - FBANK_MEAN) / (2 * FBANK_STD)


# ---------------------------------------------------------------- encoder

def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5-style bidirectional buckets, as BEATs' `_relative_positions_bucket`."""
    context = torch.arange(query_length, dtype=torch.long)[:, None]
    memory = torch.arange(key_length, dtype=torch.long)[None, :]
    relative = memory - context
    num_buckets = num_buckets // 2
    buckets = (relative > 0).to(torch.long) * num_buckets
    relative = torch.abs(relative)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative, large)


class BEATsAttention(nn.Module):
    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool):
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scaling = self.head_dim**-0.5
        self.num_buckets = cfg.num_buckets
        self.max_distance = cfg.max_distance
        self.gru_rel_pos = cfg.gru_rel_pos
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, heads)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        if cfg.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def compute_bias(self, length: int) -> torch.Tensor:
        buckets = relative_position_buckets(length, length, self.num_buckets, self.max_distance)
        buckets = buckets.to(self.relative_attention_bias.weight.device)
        return self.relative_attention_bias(buckets).permute([2, 0, 1])

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, position_bias: torch.Tensor | None):
        tgt_len, bsz, dim = x.shape
        heads, hd = self.num_heads, self.head_dim
        if hasattr(self, "relative_attention_bias") and position_bias is None:
            position_bias = self.compute_bias(tgt_len)
            position_bias = position_bias.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * heads, tgt_len, tgt_len)
        alpha = 32
        q = self.q_proj(x)
        k = self.k_proj(x)
        v = self.v_proj(x)
        q = q * self.scaling
        q = q * (1 / alpha)
        q = q.contiguous().view(tgt_len, bsz * heads, hd).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        weights = torch.bmm(q, k.transpose(1, 2))
        weights = (weights - weights.max(dim=-1, keepdim=True)[0]) * alpha
        if key_padding_mask is not None:
            weights = weights.view(bsz, heads, tgt_len, tgt_len)
            weights = weights.masked_fill(key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
            weights = weights.view(bsz * heads, tgt_len, tgt_len)
        if position_bias is not None:
            rel = position_bias
            if self.gru_rel_pos:
                query = q.view(bsz, heads, tgt_len, hd) * alpha / self.scaling
                gate_a, gate_b = torch.sigmoid(
                    self.grep_linear(query).view(bsz, heads, tgt_len, 2, 4).sum(-1, keepdim=False)
                ).chunk(2, dim=-1)
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
                rel = gate.view(bsz * heads, tgt_len, 1) * position_bias
            weights = weights + rel.view(weights.size())
        probs = F.softmax(weights, dim=-1).type_as(weights)
        out = torch.bmm(probs, v).transpose(0, 1).contiguous().view(tgt_len, bsz, dim)
        return self.out_proj(out), position_bias


class BEATsLayer(nn.Module):
    """Post-LN (deep-norm) transformer layer; `layer_norm_first` pre-LN variant also supported."""

    def __init__(self, cfg: BEATsConfig, has_relative_attention_bias: bool):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.self_attn = BEATsAttention(cfg, has_relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first
        self.alpha = math.pow(2 * cfg.encoder_layers, 1 / 4) if cfg.deep_norm else 1.0

    def _ffn(self, x):
        return self.fc2(F.gelu(self.fc1(x).float()).type_as(x))

    def forward(self, x, padding_mask, position_bias):
        residual = x
        if self.layer_norm_first:
            x, position_bias = self.self_attn(self.self_attn_layer_norm(x), padding_mask, position_bias)
            x = residual + x
            x = x + self._ffn(self.final_layer_norm(x))
            return x, position_bias
        x, position_bias = self.self_attn(x, padding_mask, position_bias)
        x = self.self_attn_layer_norm(residual * self.alpha + x)
        x = self.final_layer_norm(x * self.alpha + self._ffn(x))
        return x, position_bias


class PosConv(nn.Module):
    """Grouped Conv1d with old-style weight norm (dim=2) + SamePad + GELU, keys `pos_conv.0.*`."""

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.kernel, self.groups = kernel, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.zeros(dim, dim // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        weight = torch._weight_norm(self.weight_v, self.weight_g, 2)
        x = F.conv1d(x, weight, self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            x = x[:, :, :-1]
        return F.gelu(x)


class BEATsEncoder(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        self.pos_conv = nn.ModuleList([PosConv(dim, cfg.conv_pos, cfg.conv_pos_groups)])
        self.layers = nn.ModuleList(
            [BEATsLayer(cfg, cfg.relative_position_embedding) for _ in range(cfg.encoder_layers)]
        )
        if cfg.relative_position_embedding:
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg.layer_norm_first

    def forward(self, x, padding_mask):
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv[0](x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = x.transpose(0, 1)
        position_bias = None
        for layer in self.layers:
            x, position_bias = layer(x, padding_mask, position_bias)
        x = x.transpose(0, 1)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


def downsample_padding_mask(features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """BEATs `forward_padding_mask`: drop the remainder, view as [B, T, -1], `all(-1)`."""
    length = features.size(1)
    extra = padding_mask.size(1) % length
    if extra > 0:
        padding_mask = padding_mask[:, :-extra]
    padding_mask = padding_mask.view(padding_mask.size(0), length, -1)
    return padding_mask.all(-1)


class BEATs(nn.Module):
    def __init__(self, cfg: BEATsConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(1, cfg.embed_dim, kernel_size=cfg.input_patch_size,
                                         stride=cfg.input_patch_size, bias=cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim)
        self.post_extract_proj = (
            nn.Linear(cfg.embed_dim, cfg.encoder_embed_dim) if cfg.embed_dim != cfg.encoder_embed_dim else None
        )
        self.encoder = BEATsEncoder(cfg)
        if cfg.finetuned_model:
            self.predictor = nn.Linear(cfg.encoder_embed_dim, cfg.predictor_class)

    def token_count(self, frames: int, mel_bins: int = 128) -> int:
        """Patch tokens for `frames` fbank frames: (T_f // 16) · (128 // 16)."""
        p = self.cfg.input_patch_size
        return (frames // p) * (mel_bins // p)

    def token_padding_mask(self, raw_padding_mask: torch.Tensor, frames: int) -> torch.Tensor:
        """Sample-level mask → frame level → token level, the two `forward_padding_mask` steps."""
        frame_mask = downsample_padding_mask(torch.empty(0, frames), raw_padding_mask)
        return downsample_padding_mask(torch.empty(0, self.token_count(frames)), frame_mask)

    def extract_features(self, raw_wav: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`extract_features(raw_wav, padding_mask, feature_only=True)[0]`: [B, 8·(T_f//16), D]."""
        fbank = beats_fbank(raw_wav)
        token_mask = None
        if padding_mask is not None:
            token_mask = self.token_padding_mask(padding_mask, fbank.shape[1])
        fbank = fbank.to(self.patch_embedding.weight.dtype)
        return self.forward_fbank(fbank, token_mask)

    def forward_fbank(self, fbank: torch.Tensor, token_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """From normalised fbank [B, T_f, 128] (and the token-level mask) to features.

        This is the part exported to ONNX; the fbank and masks are computed in the runtime.
        """
        features = self.patch_embedding(fbank.unsqueeze(1))
        features = features.reshape(features.shape[0], features.shape[1], -1).transpose(1, 2)
        features = self.layer_norm(features)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        return self.encoder(features, token_padding_mask)


def load_beats(path: str | Path) -> BEATs:
    """Load a BEATs `.pt` (`cfg` + `model`, optional `label_dict`) strictly."""
    path = Path(path)
    ckpt = torch_load(path, "BEATs checkpoint")
    if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
        raise SalmonnError("not a BEATs checkpoint (expected top-level keys `cfg` and `model`)", path)
    cfg = BEATsConfig.from_dict(ckpt["cfg"])
    model = BEATs(cfg)
    state = dict(ckpt["model"])
    if cfg.relative_position_embedding:
        # Layers > 0 share layer 0's table; older files may or may not repeat it under their names.
        for i in range(1, cfg.encoder_layers):
            state.setdefault(f"encoder.layers.{i}.self_attn.relative_attention_bias.weight",
                             state.get("encoder.layers.0.self_attn.relative_attention_bias.weight"))
    load_strict(model, {k: v for k, v in state.items() if v is not None}, path, "BEATs checkpoint")
    return model.eval()
