"""`salmonn-export inspect`: what a trained SALMONN is made of, and what is inconsistent in it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from salmonn_export.model.config import load_config
from salmonn_export.model.qformer import num_windows
from salmonn_export.model.salmonn import SALMONN
from salmonn_export.model.weights import torch_load


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dtypes(module: torch.nn.Module) -> list[str]:
    return sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()})


def _checkpoint_summary(path: Path) -> dict:
    ckpt = torch_load(path, "training checkpoint")
    model = ckpt.get("model", {}) if isinstance(ckpt, dict) else {}
    groups = Counter(k.split(".")[0] for k in model)
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "top_level_keys": sorted(ckpt) if isinstance(ckpt, dict) else [],
        "tensors": len(model),
        "tensors_by_component": dict(sorted(groups.items())),
        "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None,
        "has_optimizer_state": bool(ckpt.get("optimizer")) if isinstance(ckpt, dict) else False,
    }


def consistency_problems(model: SALMONN) -> list[str]:
    """What would make this model behave unlike its author meant (inspect exits 1). The config's notes
    (ignored or misspelt fields, as in the challenge's own `Low_resource`) are reported apart."""
    cfg = model.config
    problems = []
    tok = model.llama_tokenizer
    ds_whisper = cfg.datasets.get("whisper_path")
    if ds_whisper and cfg.resolve(ds_whisper).resolve() != cfg.resolve(cfg.model.whisper_path).resolve():
        problems.append("`datasets.whisper_path` differs from `model.whisper_path`: features would come from another extractor")
    n_mels = model.speech_encoder.config.num_mel_bins
    if model.feature_extractor.feature_size != n_mels:
        problems.append(f"feature extractor makes {model.feature_extractor.feature_size} mel bins, Whisper expects {n_mels}")
    end_ids = tok(cfg.generate.end_sym, add_special_tokens=False).input_ids
    if len(end_ids) != 1:
        problems.append(f"`generate.end_sym` {cfg.generate.end_sym!r} is not one token of this tokenizer")
    eos = model.causal_lm.generation_config.eos_token_id
    eos_list = eos if isinstance(eos, list) else [eos]
    if len(end_ids) == 1 and end_ids[0] not in eos_list:
        problems.append(f"end_sym id {end_ids[0]} is not in the LLM's generation eos list {eos_list}: "
                        "outputs run to max_new_tokens")
    if tok.bos_token_id is None:
        problems.append("the tokenizer has no BOS token; prompt wrap prepends BOS")
    if cfg.model.num_speech_query_token != 1:
        problems.append("num_speech_query_token != 1: the challenge models all use 1 query per window")
    return problems


def inspect_model(config_path: str | Path) -> dict:
    """Load strictly and describe; a loading failure is raised (it *is* the consistency problem)."""
    cfg = load_config(config_path)
    model = SALMONN(cfg)
    m = cfg.model
    llm = model.causal_lm
    lcfg = llm.config
    windows = num_windows(1500, model.window, model.stride)
    lora_modules = sorted({n.split(".")[-2] for n, _ in model.llama_model.named_modules() if n.endswith("lora_A")})
    lora_count = sum(1 for n, _ in model.llama_model.named_modules() if n.endswith(".lora_A"))
    report = {
        "config": str(cfg.path),
        "components": {
            "whisper_encoder": {
                "path": str(cfg.resolve(m.whisper_path)), "params": _params(model.speech_encoder),
                "layers": model.speech_encoder.config.encoder_layers, "d_model": model.speech_encoder.config.d_model,
                "mel_bins": model.speech_encoder.config.num_mel_bins, "dtypes": _dtypes(model.speech_encoder),
            },
            "beats": None if model.beats is None else {
                "path": str(cfg.resolve(m.beats_path)), "params": _params(model.beats),
                "layers": model.beats.cfg.encoder_layers, "width": model.beats.cfg.encoder_embed_dim,
                "dtypes": _dtypes(model.beats),
            },
            "qformer": {
                "params": _params(model.speech_Qformer) + model.speech_query_tokens.numel(),
                "layers": len(model.speech_Qformer.bert.encoder.layer),
                "window_frames": model.window, "stride_frames": model.stride, "windows": windows,
                "speech_tokens": windows * m.num_speech_query_token,
            },
            "projection": {"in": model.speech_llama_proj.in_features, "out": model.speech_llama_proj.out_features,
                           "params": _params(model.speech_llama_proj)},
            "llm": {
                "path": str(cfg.resolve(m.llama_path)), "params": _params(llm) - sum(
                    p.numel() for n, p in llm.named_parameters() if "lora_" in n),
                "layers": lcfg.num_hidden_layers, "hidden": lcfg.hidden_size, "heads": lcfg.num_attention_heads,
                "kv_heads": lcfg.num_key_value_heads, "vocab": llm.get_input_embeddings().weight.shape[0],
                "tokenizer_len": len(model.llama_tokenizer), "tied_embeddings": bool(lcfg.tie_word_embeddings),
                "dtypes": _dtypes(llm),
                "eos": llm.generation_config.eos_token_id, "bos": model.llama_tokenizer.bos_token_id,
            },
            "lora": {"enabled": m.lora, "rank": m.lora_rank, "alpha": m.lora_alpha,
                     "scaling": m.lora_alpha / m.lora_rank, "targets": lora_modules, "adapted_linears": lora_count},
        },
        "checkpoint": _checkpoint_summary(cfg.resolve(m.ckpt)) if m.ckpt else None,
        "load_report": model.load_report,
        "generate": vars(cfg.generate),
        "notes": list(cfg.warnings),  # config fields ignored as the challenge ignores them: not an exit-1 problem
        "problems": consistency_problems(model),
    }
    report["total_params"] = sum(c["params"] for c in report["components"].values() if c and "params" in c)
    return report

