"""HF folders that the challenge's stack (transformers 4.46.3) reads exactly as we do.

transformers 5 (ours) writes three things 4.46 misreads (checked by benchmarks/compat/check_446.py):
- `config.json` nests `rope_theta` (and the rope scaling) under `rope_parameters`, which 4.46
  ignores: it silently uses θ = 10000 and no scaling, so texts change. 4.46 reads a top-level
  `rope_theta` and `rope_scaling` (`null`, or `{rope_type: llama3, factor, low_freq_factor,
  high_freq_factor, original_max_position_embeddings}` as Llama-3.2 ships it); transformers 5
  still reads those legacy keys (`convert_rope_params_to_dict`), so one form serves both.
- `config.json` names the weights' dtype `dtype`; 4.46 reads `torch_dtype`.
- `tokenizer_config.json` names `TokenizersBackend` ("Tokenizer class TokenizersBackend does not
  exist" in 4.46); `PreTrainedTokenizerFast` is the same class in 5 and exists in 4.46. 4.46 also
  writes the special tokens in `added_tokens_decoder` and `special_tokens_map.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_CLASS_446 = "PreTrainedTokenizerFast"
# keys transformers 5 adds to tokenizer_config.json that are no tokenizer arguments in 4.46
TOKENIZER_KEYS_5_ONLY = ("backend", "is_local", "local_files_only")


def config_for_446(config: dict[str, Any]) -> dict[str, Any]:
    """A model `config.json` dict in the form 4.46 reads (see module doc); other keys unchanged.

    `rope_parameters` {rope_theta, rope_type, ...} becomes top-level `rope_theta` and
    `rope_scaling` (None for rope_type "default", else the remaining fields with `rope_type`).
    Raises ValueError for nested (per-layer-type) rope parameters, which 4.46 cannot express.
    """
    out = dict(config)
    rope = out.pop("rope_parameters", None)
    if rope is not None:
        if not isinstance(rope, dict) or "rope_theta" not in rope:
            raise ValueError(f"rope_parameters {rope!r} is not one flat dict with rope_theta")
        rope = dict(rope)
        out["rope_theta"] = rope.pop("rope_theta")
        kind = rope.get("rope_type", rope.get("type", "default"))
        out["rope_scaling"] = None if kind == "default" else rope
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    return dict(sorted(out.items()))


def tokenizer_config_for_446(tokenizer_config: dict[str, Any], tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """`tokenizer_config.json` as 4.46 writes it for a fast tokenizer: PreTrainedTokenizerFast,
    no transformers-5-only keys, and `added_tokens_decoder` listing tokenizer.json's added tokens."""
    out = {k: v for k, v in tokenizer_config.items() if k not in TOKENIZER_KEYS_5_ONLY}
    if out.get("tokenizer_class") in (None, "TokenizersBackend"):
        out["tokenizer_class"] = TOKENIZER_CLASS_446
    out["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in tokenizer_json.get("added_tokens", [])
    }
    return dict(sorted(out.items()))


def write_config_for_446(folder: str | Path) -> None:
    """Rewrite the `config.json` of an HF model folder we just saved (LLM or Whisper) in 4.46's form
    (sorted keys: deterministic bytes). Weights and other files are not touched."""
    config_path = Path(folder) / "config.json"
    config_path.write_text(json.dumps(config_for_446(json.loads(config_path.read_text())), indent=2) + "\n")


def write_for_446(folder: str | Path) -> None:
    """Rewrite an HF LLM folder we just saved (config + fast tokenizer) so 4.46.3 reads it as we do:
    `config.json`, `tokenizer_config.json` and `special_tokens_map.json` (the bos/eos/unk/pad the
    tokenizer config names). Raises OSError/ValueError on a folder without these files."""
    folder = Path(folder)
    write_config_for_446(folder)
    tokenizer_path = folder / "tokenizer.json"
    tc_path = folder / "tokenizer_config.json"
    tc = tokenizer_config_for_446(json.loads(tc_path.read_text()), json.loads(tokenizer_path.read_text()))
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    specials = {k: tc[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tc.get(k)}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
