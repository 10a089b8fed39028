"""What both build targets (ONNX and torch) share around their stages: timing, and writing the bundle
atomically after the data is chosen. Imports neither onnx nor torch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from salmonn_export.dataset import DataSource, choose_data
from salmonn_export.errors import SalmonnError
from salmonn_export.files import atomic_dir
from salmonn_export.model.config import load_config


@dataclass
class StageLog:
    """Stage timings (seconds, by stage name); `on_stage(name)` / `on_progress(name, done, total)`
    let the CLI draw progress."""

    on_stage: Callable[[str], None] | None = None
    on_progress: Callable[[str, int, int], None] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_stage:
            self.on_stage(name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)


def build_atomically(out: Path, force: bool, config_path: Path, calib: Path | None, needs_data: bool,
                     build_into: Callable[[Path, DataSource | None], dict]) -> dict:
    """Run `build_into(temp_folder, calibration_data)` and rename the folder to `out` when it returns.

    The calibration data (when `needs_data`) is chosen before any slow work, so a missing source stops
    the build at once. Raises SalmonnError for an existing `out` without `force` or missing data.
    Returns the build report with its final `bundle` path.
    """
    out = out.expanduser().resolve()
    if out.exists() and not force:
        raise SalmonnError("bundle already exists (use --force to replace it)", out)
    calib_data = choose_data(load_config(config_path), calib, "--calib", "calibration") if needs_data else None
    with atomic_dir(out, force=True, what="bundle") as tmp:
        report = build_into(tmp, calib_data)
    report["bundle"] = str(out)
    return report


def model_sections(cfg, salmonn, llm, lora_error: float) -> dict:
    """The manifest sections every target writes alike: `llm` shapes, `tokenizer`, `generation` (the
    config's `generate:` with the LLM's pad/eos ids) and `prompts`. `cfg` is the SalmonnConfig,
    `salmonn` the loaded reference, `llm` its merged LLM, `lora_error` the merge's max logit diff."""
    lcfg = llm.config
    tok = salmonn.llama_tokenizer
    eos = salmonn.causal_lm.generation_config.eos_token_id
    return {
        "llm": {"layers": lcfg.num_hidden_layers, "hidden": lcfg.hidden_size, "heads": lcfg.num_attention_heads,
                "kv_heads": lcfg.num_key_value_heads,
                "head_dim": getattr(lcfg, "head_dim", None) or lcfg.hidden_size // lcfg.num_attention_heads,
                "vocab": int(llm.get_input_embeddings().weight.shape[0]), "lora_merge_max_abs_logit_diff": lora_error},
        "tokenizer": {"folder": "tokenizer", "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
                      "len": len(tok)},
        "generation": {**vars(cfg.generate), "pad_token_id": salmonn.causal_lm.config.eos_token_id,
                       "eos_token_id": eos if isinstance(eos, list) else [eos]},
        "prompts": {"template": cfg.model.prompt_template, "test_prompts": salmonn.test_prompts,
                    "placeholder": "<SpeechHere>"},
    }
