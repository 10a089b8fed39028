"""The LLM side of SALMONN: base model, tokenizer with `[PAD]`, resized embeddings, LoRA via peft.

A bitsandbytes NF4 base (the challenge trained on `unsloth/...-bnb-4bit`) is dequantized on
load from its stored quant state, in plain torch, so no GPU or bitsandbytes is needed and LoRA
sits on the same NF4-dequantized weights it was trained against (spec 8.8).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from salmonn_export.errors import SalmonnError
from salmonn_export.model.weights import load_strict, read_hf_state_dict

PAD_TOKEN = "[PAD]"
BNB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                ".quant_state.bitsandbytes__fp4")


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """AutoTokenizer + `[PAD]` added as a new token, right padding (spec 2.8)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SalmonnError("LLM folder not found (no model hub access: give a local folder)", folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise SalmonnError(f"cannot load the tokenizer ({str(exc).splitlines()[0][:160]})", folder) from None
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "right"
    return tok


def _read_llama_config(folder: Path) -> dict:
    """config.json of an LLM folder, checked to be a Llama's (SALMONN's LLM is a LlamaForCausalLM:
    transformers would load another causal LM, e.g. a Whisper folder, and fail later in LoRA).
    Raises SalmonnError naming the file."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SalmonnError(f"unreadable LLM config.json ({exc})", folder / "config.json") from None
    if cfg.get("model_type") != "llama":
        found = f"a `{cfg['model_type']}` model" if cfg.get("model_type") else "no `model_type`"
        raise SalmonnError(f"LLM config names {found}, not `llama` (SALMONN's LLM is a Llama)", folder / "config.json")
    return cfg


def _bnb_quant_config(cfg: dict) -> dict | None:
    q = cfg.get("quantization_config")
    if q and q.get("quant_method") == "bitsandbytes":
        return q
    return None


def dequantize_bnb_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, state: dict,
                        nested_absmax: torch.Tensor | None = None, nested_quant_map: torch.Tensor | None = None) -> torch.Tensor:
    """bitsandbytes 4-bit blockwise dequantization (NF4/FP4 code book in `quant_map`).

    Bytes hold two codes, high nibble first; each block of `blocksize` values shares one absmax,
    itself 8-bit quantized in blocks of `nested_blocksize` when double quantization was used.
    Returns fp32 [state["shape"]] holding values of the state's `dtype` (fp16/bf16: rounded as
    bitsandbytes' own dequantization rounds them). Raises ValueError for another dtype.
    """
    codes = packed.reshape(-1).to(torch.int64)
    idx = torch.stack([(codes >> 4) & 0xF, codes & 0xF], dim=1).reshape(-1)
    values = quant_map.float()[idx]
    if nested_absmax is not None:
        nb = int(state["nested_blocksize"])
        scale = nested_quant_map.float()[absmax.reshape(-1).to(torch.int64)]
        scale = scale.view(-1)
        n = scale.numel()
        blocks = torch.repeat_interleave(nested_absmax.float().reshape(-1), nb)[:n]
        absmax_f = scale * blocks + float(state.get("nested_offset", 0.0))
    else:
        absmax_f = absmax.float().reshape(-1)
    blocksize = int(state["blocksize"])
    shape = tuple(state["shape"])
    numel = int(torch.tensor(shape).prod())
    values = values[:numel]
    scales = torch.repeat_interleave(absmax_f, blocksize)[:numel]
    out = (values * scales).reshape(shape)
    # bitsandbytes writes the product in the quant state's dtype (the compute dtype the LLM ran in):
    # round there, so the weights equal `bnb.functional.dequantize_4bit`'s bit for bit
    stored = BNB_DTYPES.get(str(state.get("dtype", "float32")).removeprefix("torch."))
    if stored is None:
        raise ValueError(f"quant state dtype {state.get('dtype')!r} is not one of {', '.join(BNB_DTYPES)}")
    return out.to(stored).float()


def _dequantize_bnb_state(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    quantized = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in state if k.endswith(".quant_state.bitsandbytes__nf4")]
    quantized += [k[: -len(".quant_state.bitsandbytes__fp4")] for k in state if k.endswith(".quant_state.bitsandbytes__fp4")]
    consumed = set()
    for name in quantized:
        qs_key = next(k for k in (f"{name}.quant_state.bitsandbytes__nf4", f"{name}.quant_state.bitsandbytes__fp4") if k in state)
        try:
            qs = json.loads(bytes(state[qs_key].to(torch.uint8).tolist()).decode("utf-8"))
            nested = f"{name}.nested_absmax" in state
            out[name] = dequantize_bnb_4bit(
                state[name], state[f"{name}.absmax"], state[f"{name}.quant_map"], qs,
                state.get(f"{name}.nested_absmax"), state.get(f"{name}.nested_quant_map"),
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise SalmonnError(f"cannot dequantize bitsandbytes 4-bit weight `{name}` ({exc})", source) from None
        consumed.update(k for k in state if k == name or (k.startswith(name + ".") and k.endswith(BNB_SUFFIXES)))
        if not nested:
            consumed.discard(f"{name}.nested_absmax")
    for k, v in state.items():
        if k not in consumed:
            if k.endswith(BNB_SUFFIXES) or (v.dtype == torch.uint8 and k.endswith(".weight")):
                raise SalmonnError(f"bitsandbytes tensor `{k}` has no usable quant state", source)
            out[k] = v
    return out


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype an HF folder's weights are stored in (config.json `dtype`/`torch_dtype`; fp32 if unsaid)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def load_base_llm(folder: str | Path, keep_stored_dtype: bool = False) -> torch.nn.Module:
    """The base LlamaForCausalLM in fp32 (NF4 bases dequantized).

    `keep_stored_dtype` (for `build` at real size: a 3B LLM is 12.8 GB in fp32, 6.4 GB in fp16):
    decoder-layer weights stay in the half precision they are stored in, which is lossless
    (every fp16/bf16 value is exact in fp32); embeddings, final norm and lm_head are fp32 at once.
    Then `compute_layers_in_fp32` must be applied so every layer computes in fp32 as the reference.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SalmonnError("LLM folder has no config.json (no model hub access: give a local folder)", folder)
    quant = _bnb_quant_config(_read_llama_config(folder))
    if quant is None:
        dtype = stored_dtype(folder) if keep_stored_dtype else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise SalmonnError(f"cannot load the LLM ({str(exc).splitlines()[0][:200]})", folder) from None
        if dtype != torch.float32:
            for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
                module.float()  # Module.float keeps Parameter objects: a tied lm_head stays tied
        return model.eval()
    if not quant.get("load_in_4bit"):
        raise SalmonnError("8-bit bitsandbytes LLM checkpoints cannot be dequantized here; give the unquantized base", folder)
    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = _dequantize_bnb_state(read_hf_state_dict(folder, "LLM"), folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("rotary_emb.inv_freq")}
    load_strict(model, state, folder, "bitsandbytes 4-bit LLM")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def resize_with_mean_rows(model: torch.nn.Module, new_size: int) -> None:
    """Grow the vocab to `new_size`, new rows = exact mean of the old rows (our documented rule, spec 2.8).

    The challenge draws the new row at random on every load; any fixed rule is a choice, the mean is
    the deterministic centre of that distribution.
    """
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if new_size <= old:
        return
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    old_emb = emb.weight.detach().clone()
    old_head = head.weight.detach().clone() if head is not None and not tied else None
    model.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = old_emb.mean(dim=0)
        if old_head is not None:
            model.get_output_embeddings().weight[old:] = old_head.mean(dim=0)


def consume_tied_lm_head(model: torch.nn.Module, head: torch.Tensor, base_vocab_size: int, key: str,
                         source: str | Path) -> None:
    """Take a tied LLM's `lm_head.weight` from a training checkpoint, as the challenge's load does (spec 2.8).

    `model` is the (resized) LlamaForCausalLM whose input and output embeddings share one tensor
    [vocab, hidden]; `head` is the checkpoint's copy of that whole matrix (any float dtype). The
    runner saved it because `named_parameters()` lists a tied tensor once (as `embed_tokens`), and
    the challenge's `strict=False` load writes it back into the shared tensor. Rows below
    `base_vocab_size` are the frozen base embeddings: each must equal ours once cast to the
    checkpoint's dtype. Rows from `base_vocab_size` on (the training-time `[PAD]` row) replace our
    mean rows. Raises SalmonnError naming `key` on a shape or value disagreement.
    """
    weight = model.get_input_embeddings().weight
    if tuple(head.shape) != tuple(weight.shape):
        raise SalmonnError(f"`{key}` has shape {tuple(head.shape)}, the tied embeddings are {tuple(weight.shape)}",
                           source)
    if not head.is_floating_point():
        raise SalmonnError(f"`{key}` is {head.dtype}, not a float embedding matrix", source)
    base_rows = weight[:base_vocab_size].detach().to(head.dtype)
    differ = (base_rows != head[:base_vocab_size]).any(dim=1).nonzero().flatten()
    if differ.numel():
        raise SalmonnError(f"`{key}` disagrees with the LLM's embeddings in {differ.numel()} base row(s) "
                           f"(first: row {int(differ[0])}); the checkpoint was trained on another base LLM", source)
    with torch.no_grad():
        weight[base_vocab_size:] = head[base_vocab_size:].to(weight.dtype)


def apply_lora(model: torch.nn.Module, rank: int, alpha: int, dropout: float):
    """peft LoRA exactly as SALMONN configures it (targets: peft's llama default, q_proj and v_proj)."""
    config = LoraConfig(task_type="CAUSAL_LM", inference_mode=False, r=rank, lora_alpha=alpha, lora_dropout=dropout)
    peft_model = get_peft_model(model, config)
    return peft_model.eval()


def compute_layers_in_fp32(model: torch.nn.Module) -> list:
    """Make each decoder layer of `model` compute in fp32 while storing its weights in half precision.

    Before a layer runs, its fp16/bf16 parameters are upcast in place to fp32; after it, they go back
    to their stored dtype. Lossless (the stored values are exact in fp32 and a forward does not
    change weights), so outputs equal the fp32-loaded model's; only one layer is in fp32 at a time.
    Parameters already fp32 (LoRA adapters, merged weights) are left alone. Returns the hook handles.
    """
    inner = model.model if hasattr(model, "model") else model
    while not hasattr(inner, "layers") and hasattr(inner, "model"):
        inner = inner.model
    handles = []
    for layer in inner.layers:
        def upcast(module, _args, _state=None):
            # extended, not replaced: a forward that raised (a capture hook) never ran `restore`
            module._stored_half = getattr(module, "_stored_half", []) + [
                (p, p.dtype) for p in module.parameters() if p.dtype in (torch.float16, torch.bfloat16)]
            for p, _ in module._stored_half:
                p.data = p.data.float()

        def restore(module, _args, _output):
            for p, dtype in getattr(module, "_stored_half", []):
                p.data = p.data.to(dtype)
            module._stored_half = []

        handles += [layer.register_forward_pre_hook(upcast), layer.register_forward_hook(restore)]
    return handles
