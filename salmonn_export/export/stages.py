"""What both build targets (ONNX and torch) share around their stages: timing, and writing the bundle
atomically after the data is chosen. Imports neither onnx nor torch."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from salmonn_export.bundle import sha256_file
from salmonn_export.dataset import DataSource, choose_data
from salmonn_export.errors import SalmonnError, SalmonnWarning
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


@contextlib.contextmanager
def _recording_warnings() -> Iterator[list[str]]:
    """The SalmonnWarnings shown while the block runs (still printed through the current hook)."""
    seen: list[str] = []
    previous = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, SalmonnWarning):
            seen.append(str(message))
        previous(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield seen
    finally:
        warnings.showwarning = previous


def build_atomically(out: Path, force: bool, config_path: Path, calib: Path | None, needs_data: bool,
                     build_into: Callable[[Path, DataSource | None], dict], audio_root: Path | None = None) -> dict:
    """Run `build_into(temp_folder, calibration_data)` and rename the folder to `out` when it returns.

    The calibration data (when `needs_data`) is chosen before any slow work, so a missing source stops
    the build at once. Raises SalmonnError for an existing `out` without `force` or missing data.
    Returns the build report with its final `bundle` path.
    """
    out = out.expanduser().resolve()
    if out.exists() and not force:
        raise SalmonnError("bundle already exists (use --force to replace it)", out)
    with _recording_warnings() as seen:  # printed as they happen, and kept in the report (--json)
        if needs_data:
            calib_data = choose_data(load_config(config_path), calib, "--calib", "calibration", audio_root)
        else:
            calib_data = None
            if calib is not None or audio_root is not None:
                warnings.warn("this recipe does not calibrate (no quantized weights): --calib/--audio-root are not used",
                              SalmonnWarning, stacklevel=2)
        with atomic_dir(out, force=True, what="bundle") as tmp:
            report = build_into(tmp, calib_data)
    report["warnings"] = [*report.get("warnings", []), *(w for w in seen if w not in report.get("warnings", []))]
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


def source_hashes(cfg) -> dict[str, str]:
    """sha256 of the config, checkpoint, BEATs file and every file of the Whisper and LLM folders
    (the manifest's `source.sha256`, and the quantization cache's model key). `cfg`: SalmonnConfig."""
    m = cfg.model
    hashes = {"config": sha256_file(cfg.path)} if cfg.path else {}
    for label, value in (("ckpt", m.ckpt), ("beats", m.beats_path)):
        if value:
            hashes[label] = sha256_file(cfg.resolve(value))
    for label, value in (("whisper", m.whisper_path), ("llm", m.llama_path)):
        folder = cfg.resolve(value)
        for f in sorted(folder.iterdir()):
            if f.is_file():
                hashes[f"{label}/{f.name}"] = sha256_file(f)
    return hashes


RUNTIME_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer(tokenizer, folder: Path) -> None:
    """Save the LLM's (fast) tokenizer as the runtime reads it: only RUNTIME_TOKENIZER_FILES, and a
    tokenizer.json without padding or truncation. A fast tokenizer keeps the padding a batched call
    last enabled on its backend and `save_pretrained` writes it, so without this the file depended on
    what the build had tokenized before (a cached calibration gave a different bundle)."""
    from tokenizers import Tokenizer

    tokenizer.save_pretrained(str(folder))
    for f in folder.iterdir():
        if f.name not in RUNTIME_TOKENIZER_FILES:
            f.unlink()
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.no_padding()
    backend.no_truncation()
    backend.save(str(folder / "tokenizer.json"))
