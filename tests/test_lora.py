"""LoRA is really applied: outputs differ from the base LLM and equal peft's own forward."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from salmonn_export.model.llm import resize_with_mean_rows


def test_lora_changes_outputs_and_matches_an_independent_peft_model(tiny_model, tiny_dir):
    torch.manual_seed(0)
    embeds = torch.randn(2, 20, 64)
    mask = torch.ones(2, 20, dtype=torch.long)
    with torch.no_grad():
        ours = tiny_model.causal_lm(inputs_embeds=embeds, attention_mask=mask).logits
        with tiny_model.llama_model.disable_adapter():
            base_logits = tiny_model.causal_lm(inputs_embeds=embeds, attention_mask=mask).logits
    assert (ours - base_logits).abs().max() > 1e-2

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "llm", dtype=torch.float32)
    resize_with_mean_rows(base, len(tiny_model.llama_tokenizer))
    peft_model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1)).eval()
    state = torch.load(tiny_dir / "checkpoint_best.pth", weights_only=True)["model"]
    lora = {k[len("llama_model."):]: v for k, v in state.items() if k.startswith("llama_model.")}
    missing, unexpected = peft_model.load_state_dict(lora, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    with torch.no_grad():
        theirs = peft_model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    # and by hand: W + (B @ A) * alpha / r on q_proj of layer 0
    q = tiny_model.causal_lm.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    manual = x @ (q.base_layer.weight + (q.lora_B["default"].weight @ q.lora_A["default"].weight) * 4.0).T
    torch.testing.assert_close(q(x), manual, rtol=1e-5, atol=1e-5)
