"""Range rules for generation settings, shared by the config parser (`generate:`), the PyTorch
reference and the ONNX runtime (a bundle's `generation` section and per-call overrides). No torch,
no model code: the runtime imports it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from salmonn_export.errors import SalmonnError

MAX_NEW_TOKENS_LIMIT = 4096
"""Most new tokens one call may generate (max_new_tokens, min_length). Llama-2's context is 4096
positions and the speech prompt alone takes ~100, so no real decode needs more; the ONNX runtime's KV
cache and the torch engine's static cache are allocated for prompt + max_new_tokens positions up front
(`runtime/kv_cache.py`, `torch_engine/llama.py` `setup_cache`, bounded by its RoPE table), so an
unbounded value is an allocation failure, not a long decode."""

NUM_BEAMS_LIMIT = 64
"""Most beams: every beam is a row of the KV cache (batch × beams rows), and beyond a few dozen beams
search quality stops changing while memory grows linearly."""


def check_generate(values: dict[str, Any], source: str | Path | None = None, prefix: str = "",
                   overrides: bool = False) -> None:
    """Range-check generation settings: a config's `generate:` values (None, YAML null, is refused)
    or per-call overrides (`overrides=True`: None means not given).

    Rules are those under which transformers' `generate` (4.46, the challenge's) runs without error
    and our runtime decodes: 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT (4096), 1 <= num_beams <=
    NUM_BEAMS_LIMIT (64); 0 <= min_length <= MAX_NEW_TOKENS_LIMIT; temperature finite and
    >= 0 (> 0 when do_sample); 0 <= top_p <= 1; repetition_penalty > 0; length_penalty finite;
    end_sym a non-empty string (texts are split on it). Raises SalmonnError naming the field and value.
    """
    def bad(name: str, rule: str) -> SalmonnError:
        return SalmonnError(f"`{prefix}{name}` must be {rule}, got {values[name]!r}", source)

    def number(name: str, integer: bool) -> float | None:
        v = values.get(name)
        if v is None and (overrides or name not in values):
            return None
        if v is None or isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            raise bad(name, "an integer" if integer else "a number")
        if not math.isfinite(v):
            raise bad(name, "a finite number")
        return v

    for name, low, high in (("max_new_tokens", 1, MAX_NEW_TOKENS_LIMIT), ("num_beams", 1, NUM_BEAMS_LIMIT),
                            ("min_length", 0, MAX_NEW_TOKENS_LIMIT)):
        if (v := number(name, True)) is not None and v < low:
            raise bad(name, f">= {low}")
        if v is not None and v > high:
            raise bad(name, f"between {low} and {high}")
    if (v := number("temperature", False)) is not None and (v < 0 or (v == 0 and values.get("do_sample"))):
        raise bad("temperature", "> 0 with do_sample" if values.get("do_sample") else ">= 0")
    if (v := number("top_p", False)) is not None and not 0 <= v <= 1:
        raise bad("top_p", "between 0 and 1")
    if (v := number("repetition_penalty", False)) is not None and v <= 0:
        raise bad("repetition_penalty", "> 0")
    number("length_penalty", False)
    if "end_sym" in values and not (values["end_sym"] is None and overrides) and (
            not isinstance(values["end_sym"], str) or not values["end_sym"]):
        raise bad("end_sym", "a non-empty string")
