"""LoRA merge: fold every adapter into its base weight, W ← W + (B·A)·alpha/r.

The result is a plain LlamaForCausalLM (vocab with `[PAD]`), which is what gets quantized and
exported. The reference model is left untouched (we merge a deep copy).
"""

from __future__ import annotations

import copy

import torch

from salmonn_export.model.salmonn import SALMONN


def merged_llm(salmonn: SALMONN) -> torch.nn.Module:
    """A merged copy of the SALMONN's LLM in fp32 (a NF4-dequantized base merges the same way)."""
    if not salmonn.config.model.lora:
        return copy.deepcopy(salmonn.causal_lm).float().eval()
    peft_copy = copy.deepcopy(salmonn.llama_model)
    merged = peft_copy.merge_and_unload(safe_merge=True)
    return merged.float().eval()


@torch.no_grad()
def merge_error(salmonn: SALMONN, merged: torch.nn.Module, seq_len: int = 24, seed: int = 0) -> float:
    """Max |logit difference| between the adapter model and the merged model on random embeddings."""
    gen = torch.Generator().manual_seed(seed)
    hidden = merged.config.hidden_size
    embeds = torch.randn(2, seq_len, hidden, generator=gen) * salmonn.embed_tokens(torch.tensor([0])).std()
    mask = torch.ones(2, seq_len, dtype=torch.long)
    ref = salmonn.causal_lm(inputs_embeds=embeds, attention_mask=mask).logits
    out = merged(inputs_embeds=embeds, attention_mask=mask).logits
    return float((ref - out).abs().max())
