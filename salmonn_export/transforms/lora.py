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


@torch.no_grad()
def merge_in_place(salmonn: SALMONN, seq_len: int = 24, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """Merge the adapters into the SALMONN's own LLM (no copy: a 3B LLM is 12.8 GB in fp32).

    The SALMONN is loaded in fp32 on CPU, or with `low_memory` (fp16-stored layers computed in fp32, LoRA
    targets in fp32), so the merge is computed in fp32 either way. Returns the merged LlamaForCausalLM and
    `merge_error`'s figure (max |logit difference| on the
    same random embeddings), measured before and after the merge. Afterwards the SALMONN's LLM *is*
    the merged model (its encoders, Q-Former and embeddings are unchanged): for `build`, which
    needs the adapter model no more.
    """
    if not salmonn.config.model.lora:
        return salmonn.causal_lm.eval(), 0.0
    gen = torch.Generator().manual_seed(seed)
    hidden = salmonn.causal_lm.config.hidden_size
    embeds = torch.randn(2, seq_len, hidden, generator=gen) * salmonn.embed_tokens(torch.tensor([0])).std()
    mask = torch.ones(2, seq_len, dtype=torch.long)
    ref = salmonn.causal_lm(inputs_embeds=embeds, attention_mask=mask).logits
    # no .float(): a low-memory SALMONN keeps its layers in fp16 storage on purpose (computed in fp32)
    merged = salmonn.llama_model.merge_and_unload(safe_merge=True).eval()
    out = merged(inputs_embeds=embeds, attention_mask=mask).logits
    return merged, float((ref - out).abs().max())
