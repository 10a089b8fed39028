"""A plain-PyTorch Llama decoder with a static KV cache (gpt-fast style) over the merged LLM.

Numerically it follows transformers' LlamaForCausalLM (RMSNorm in fp32, RoPE tables from HF's
own `LlamaRotaryEmbedding`, so llama3 rope scaling and attention scaling are HF's, SiLU MLP,
SDPA attention with scale head_dim^-0.5). The cache is preallocated per layer as
[N, kv_heads, max_len, head_dim] buffers and written with `index_copy_`; GQA runs through
`scaled_dot_product_attention(enable_gqa=True)`, without materialised repeat_kv copies.

Two calls: `prefill` (the whole prompt, attention over the fresh keys only, causal and padding
mask, exactly what HF computes) and `decode` (one token per row, attention over the full static
cache with a key mask, so its shapes never change and it can be captured by
`torch.compile(mode="reduce-overhead")` / CUDA graphs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, S, D]; cos/sin [N, S, D]."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, linears: dict[str, nn.Module]):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj, self.k_proj = linears["q_proj"], linears["k_proj"]
        self.v_proj, self.o_proj = linears["v_proj"], linears["o_proj"]
        self.register_buffer("k_cache", None, persistent=False)  # [N, kv_heads, max_len, head_dim], set by setup_cache
        self.register_buffer("v_cache", None, persistent=False)

    def _qkv(self, x, cos, sin):
        N, S, _ = x.shape
        q = self.q_proj(x).view(N, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(N, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(N, S, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, slots: torch.Tensor, mask: torch.Tensor, prefill: bool) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        self.k_cache.index_copy_(2, slots, k)
        self.v_cache.index_copy_(2, slots, v)
        if not prefill:
            k, v = self.k_cache, self.v_cache
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                             enable_gqa=self.heads != self.kv_heads)
        N, _, S, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(N, S, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, linears: dict[str, nn.Module], norms: dict[str, torch.Tensor]):
        super().__init__()
        self.self_attn = Attention(cfg, linears)
        self.gate_proj, self.up_proj, self.down_proj = linears["gate_proj"], linears["up_proj"], linears["down_proj"]
        self.input_layernorm = RMSNorm(norms["input_layernorm"], cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(norms["post_attention_layernorm"], cfg.rms_norm_eps)

    def forward(self, x, cos, sin, slots, mask, prefill: bool):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, mask, prefill)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class StaticCacheLlama(nn.Module):
    """The merged Llama: embed_tokens [V, H], layers, norm, lm_head (tied or its own module).

    `linears[name]` gives each Linear as a module (dense or `Int4Linear`), by HF name
    (`model.layers.0.self_attn.q_proj`, `lm_head`)."""

    def __init__(self, cfg: LlamaConfig, state: dict[str, torch.Tensor], linears: dict[str, nn.Module],
                 device: torch.device, dtype: torch.dtype, max_positions: int = 4096):
        super().__init__()
        self.cfg = cfg
        self.dtype, self.device = dtype, device
        self.embed_tokens = state["model.embed_tokens.weight"].to(device=device, dtype=dtype)
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            lin = {n.split(".")[-1]: linears[p + n] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                              "mlp.down_proj")}
            norms = {n: state[f"{p}{n}.weight"].to(device=device, dtype=dtype)
                     for n in ("input_layernorm", "post_attention_layernorm")}
            layers.append(DecoderLayer(cfg, lin, norms))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(state["model.norm.weight"].to(device=device, dtype=dtype), cfg.rms_norm_eps)
        self.lm_head = linears.get("lm_head")  # None: tied to embed_tokens
        rope = LlamaRotaryEmbedding(cfg)
        positions = torch.arange(max_positions)[None]
        cos, sin = rope(torch.zeros((), dtype=dtype), positions)
        self.register_buffer("cos_table", cos[0].to(device), persistent=False)
        self.register_buffer("sin_table", sin[0].to(device), persistent=False)
        self.cache_shape: tuple[int, int] | None = None
        self.register_buffer("key_mask", None, persistent=False)

    # ------------------------------------------------------------------ cache

    def setup_cache(self, rows: int, max_len: int) -> None:
        """(Re)allocate the static cache for `rows` sequences of up to `max_len` tokens; zeroes it."""
        if self.cache_shape == (rows, max_len):
            for layer in self.layers:
                layer.self_attn.k_cache.zero_()
                layer.self_attn.v_cache.zero_()
            self.key_mask.zero_()
            return
        if max_len > self.cos_table.shape[0]:
            raise ValueError(f"cache length {max_len} exceeds the RoPE table ({self.cos_table.shape[0]})")
        a = self.layers[0].self_attn
        shape = (rows, a.kv_heads, max_len, a.head_dim)
        for layer in self.layers:
            layer.self_attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.key_mask = torch.zeros(rows, max_len, dtype=torch.bool, device=self.device)
        self.cache_shape = (rows, max_len)

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Beam search: row i of the cache becomes old row rows[i]. In place when the row count is
        unchanged (beam steps); reallocated when it changes (B prompts expanded to B·beams rows)."""
        if rows.numel() != self.cache_shape[0]:
            for layer in self.layers:
                a = layer.self_attn
                a.k_cache, a.v_cache = a.k_cache.index_select(0, rows), a.v_cache.index_select(0, rows)
            self.key_mask = self.key_mask.index_select(0, rows)
            self.cache_shape = (rows.numel(), self.cache_shape[1])
            return
        for layer in self.layers:
            a = layer.self_attn
            a.k_cache.copy_(a.k_cache.index_select(0, rows))
            a.v_cache.copy_(a.v_cache.index_select(0, rows))
        self.key_mask.copy_(self.key_mask.index_select(0, rows))

    # ------------------------------------------------------------------ forward

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed_tokens)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_tokens)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """embeds [N, S, H], attention_mask [N, S] (1 = token), positions [N, S] → logits of the last
        position [N, 1, V]. Fills cache slots 0..S−1 and the key mask."""
        N, S, _ = embeds.shape
        slots = torch.arange(S, device=self.device)
        valid = attention_mask.to(device=self.device, dtype=torch.bool)
        self.key_mask[:, :S] = valid
        causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        x = embeds.to(self.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, slots, mask, prefill=True)
        return self._logits(x[:, -1:])

    def decode(self, embeds: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """One token per row: embeds [N, 1, H], positions [N, 1], slot: 1-element long tensor (the
        cache index written) → logits [N, 1, V]. Static shapes: capturable in a CUDA graph."""
        self.key_mask.index_fill_(1, slot, True)
        mask = self.key_mask[:, None, None, :]
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, slot, mask, prefill=False)
        return self._logits(x)
