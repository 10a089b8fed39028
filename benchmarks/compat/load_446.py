"""Runs INSIDE the side venv (transformers 4.46.3, the challenge's stack): load our HF folders as the
challenge code does and write what it sees. Imports only transformers, torch and numpy.

usage: python load_446.py JOB.json OUT_DIR   (JOB: {"texts": [...], "folders": [{"name", "llm", "whisper"}]})
Writes OUT_DIR/<name>.json (values) and OUT_DIR/<name>.<what>.npy (logits, inv_freq, features, encoder).
"""

import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor, WhisperModel


def probe_llm(folder: str, texts: list[str], out: Path, name: str) -> dict:
    # SALMONN: AutoTokenizer(use_fast=False) (Llama-3 has no slow tokenizer: resolves to the fast one),
    # then add [PAD] as a new token, right padding (spec 2.8)
    tok = AutoTokenizer.from_pretrained(folder, use_fast=False)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.padding_side = "right"
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    rotary = model.model.rotary_emb
    np.save(out / f"{name}.inv_freq.npy", rotary.inv_freq.double().numpy())
    with torch.no_grad():
        forward_ids = torch.tensor([[tok.bos_token_id] + ids[0]])
        logits = model(input_ids=forward_ids).logits
    np.save(out / f"{name}.logits.npy", logits.double().numpy())
    return {
        "tokenizer_class": type(tok).__name__, "len_tokenizer": len(tok), "ids": ids,
        "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "decoded": [tok.decode(i) for i in ids],
        "config": {"rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling, "vocab_size": config.vocab_size,
                   "tie_word_embeddings": config.tie_word_embeddings, "hidden_size": config.hidden_size,
                   "num_hidden_layers": config.num_hidden_layers, "num_key_value_heads": config.num_key_value_heads,
                   "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
                   "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                   "torch_dtype": str(config.torch_dtype).replace("torch.", "")},
        "generation_eos_token_id": model.generation_config.eos_token_id,
        "attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)),
        "tied_in_memory": model.lm_head.weight is model.model.embed_tokens.weight,
        "forward_ids": forward_ids[0].tolist(),
    }


def probe_whisper(folder: str, out: Path, name: str) -> dict:
    fe = WhisperFeatureExtractor.from_pretrained(folder)
    wave = np.sin(np.arange(16000 * 2) * 2 * np.pi * 440 / 16000).astype(np.float32) * 0.3
    feats = fe(wave, sampling_rate=16000, return_tensors="pt").input_features
    encoder = WhisperModel.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager").encoder.eval()
    with torch.no_grad():
        hidden = encoder(feats).last_hidden_state
    np.save(out / f"{name}.features.npy", feats.double().numpy())
    np.save(out / f"{name}.encoder.npy", hidden.double().numpy())
    c = encoder.config
    return {"config": {"d_model": c.d_model, "num_mel_bins": c.num_mel_bins, "encoder_layers": c.encoder_layers,
                       "max_source_positions": c.max_source_positions}, "feature_size": fe.feature_size}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for folder in job["folders"]:
        name = folder["name"]
        result = {"transformers": transformers.__version__, "torch": torch.__version__}
        for what in ("llm", "whisper"):
            if not folder.get(what):
                continue
            try:
                if what == "llm":
                    result[what] = probe_llm(folder["llm"], job["texts"], out, name)
                else:
                    result[what] = probe_whisper(folder["whisper"], out, name)
            except Exception as exc:  # a folder 4.46 cannot read is a result, not a crash of the check
                result[what] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                                "traceback_tail": traceback.format_exc().splitlines()[-3:]}
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
