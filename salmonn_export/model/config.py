"""The challenge's YAML config (`model:`, `generate:`, `datasets:`, `run:`), parsed strictly.

Every field the challenge code reads is known here with its code default (spec 1.1-1.3).
Unknown fields are kept but reported as warnings (the challenge code ignores them silently,
which is how `Low_resource: True` ends up doing nothing); missing required fields are errors.
Relative paths resolve against the config file's folder first, then the working directory
(the challenge's own behaviour), so a bundle of files can be moved as one folder.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from salmonn_export.errors import SalmonnError
from salmonn_export.generation_rules import check_generate


@dataclass
class ModelConfig:
    llama_path: str = ""
    whisper_path: str = ""
    beats_path: str = ""
    token: str | None = None
    only_preprocessor: bool | None = None
    ckpt: str = ""
    freeze_whisper: bool = True
    freeze_beats: bool = True
    use_speech_Qformer: bool = True
    freeze_speech_QFormer: bool = False
    window_level_Qformer: bool = True
    num_speech_query_token: int = 1
    second_per_window: float = 0.333333
    second_stride: float = 0.333333
    speech_llama_proj_model: str = ""
    freeze_speech_llama_proj: bool = False
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    multi_prompt: bool = False
    prompt_template: str = ""
    prompt_path: str = ""
    test_prompt_path: str = ""
    max_txt_len: int = 128
    end_sym: str = "</s>"
    low_resource: bool = False
    device_8bit: int = 0
    load_in_4bit: bool = False


@dataclass
class GenerateConfig:
    max_new_tokens: int = 200
    num_beams: int = 4
    do_sample: bool = False
    min_length: int = 1
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    end_sym: str = "<|end_of_text|>"


REQUIRED_MODEL_FIELDS = ("llama_path", "whisper_path")
MODEL_PATH_FIELDS = (
    "llama_path", "whisper_path", "beats_path", "ckpt", "speech_llama_proj_model",
    "prompt_path", "test_prompt_path",
)
DATASET_FIELDS = ("prefix", "train_ann_path", "valid_ann_path", "test_ann_path", "whisper_path")
DATASET_PATH_FIELDS = DATASET_FIELDS
RUN_FIELDS = (
    "seed", "output_dir", "exp_name", "evaluate", "log_freq", "epoch_based", "iters_per_epoch",
    "accum_grad_iters", "batch_size_train", "batch_size_eval", "num_workers", "device",
    "use_distributed", "amp", "world_size", "dist_url", "optims",
)
OPTIM_FIELDS = ("max_epoch", "warmup_steps", "warmup_start_lr", "init_lr", "min_lr", "weight_decay", "beta2")
KNOWN_MISSPELLINGS = {
    "Low_resource": "the challenge code reads `low_resource`, so this field is ignored (as it was there)",
}
SECTIONS = ("model", "generate", "datasets", "run")


@dataclass
class SalmonnConfig:
    """A parsed config. `raw` is the YAML as read (overrides applied), for saving beside outputs."""

    model: ModelConfig
    generate: GenerateConfig
    datasets: dict[str, Any]
    run: dict[str, Any]
    path: Path | None
    raw: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, value: str) -> Path:
        """Resolve a path field: config folder first, then the working directory."""
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        beside = self.root / p
        if beside.exists() or not p.exists():
            return beside
        return p.resolve()


def _typed(section: str, name: str, value: Any, default: Any, source: str) -> Any:
    """Coerce YAML scalars to the field's type; a wrong type is an error naming the field."""
    if value is None or default is None:
        return value
    want = type(default)
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise SalmonnError(f"field `{section}.{name}` must be {want.__name__}, got {value!r}", source)


def _check_windowing(model, source) -> None:
    """The window-level Q-Former's numbers (spec 2.6): windows of round(1500·s/30) Whisper frames, at
    least one window and one query. Raises SalmonnError naming the field."""
    if not model.window_level_Qformer:
        raise SalmonnError("`model.window_level_Qformer: false` (one Q-Former pass over the whole clip) is not "
                           "supported; the challenge's SALMONN uses window-level Q-Former", source)
    for name in ("second_per_window", "second_stride"):
        value = getattr(model, name)
        frames = round(1500 * value / 30.0) if isinstance(value, (int, float)) else 0
        if not 1 <= frames <= 1500:
            raise SalmonnError(f"`model.{name}: {value}` must give 1 to 1500 Whisper frames (0.02 to 30 s)", source)
    if model.num_speech_query_token < 1:
        raise SalmonnError(f"`model.num_speech_query_token` must be >= 1, got {model.num_speech_query_token}", source)


def _build(cls, section: str, data: dict[str, Any], source: str, warnings: list[str]):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key in known:
            kwargs[key] = _typed(section, key, value, known[key].default, source)
        elif key in KNOWN_MISSPELLINGS:
            warnings.append(f"`{section}.{key}`: {KNOWN_MISSPELLINGS[key]}")
        else:
            warnings.append(f"unknown field `{section}.{key}` is ignored")
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], option: str, source: str) -> None:
    """`--options model.ckpt=x.pth` style overrides, parsed as YAML scalars like OmegaConf does."""
    if "=" not in option:
        raise SalmonnError(f"override {option!r} must look like section.field=value", source)
    key, value = option.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SalmonnError(f"override {option!r}: `{part}` is not a section", source)
    node[parts[-1]] = yaml.safe_load(value) if value != "" else ""


def parse_config(raw: dict[str, Any], path: Path | None = None, overrides: list[str] | None = None) -> SalmonnConfig:
    source = str(path) if path else "<config>"
    raw = copy.deepcopy(raw)
    for option in overrides or []:
        _apply_override(raw, option, source)
    if not isinstance(raw, dict):
        raise SalmonnError("the config must be a YAML mapping with a `model:` section", source)
    warnings: list[str] = []
    for key in raw:
        if key not in SECTIONS:
            warnings.append(f"unknown section `{key}` is ignored")
    model_raw = raw.get("model")
    if model_raw is None:
        raise SalmonnError("missing required section `model:`", source)
    if not isinstance(model_raw, dict):
        raise SalmonnError(f"`model:` must be a mapping of fields, not a {type(model_raw).__name__}", source)
    for name in REQUIRED_MODEL_FIELDS:
        if not model_raw.get(name):
            raise SalmonnError(f"missing required field `model.{name}`", source)
    model = _build(ModelConfig, "model", model_raw, source, warnings)
    if not model.use_speech_Qformer:
        raise SalmonnError("`model.use_speech_Qformer: false` is not supported by SALMONN (NotImplementedError there)", source)
    _check_windowing(model, source)
    if model.low_resource or model.load_in_4bit:
        warnings.append("`low_resource`/`load_in_4bit` quantize the LLM on the fly on a GPU; the reference loads it unquantized")
    gen_raw = raw.get("generate") or {}
    if not isinstance(gen_raw, dict):
        raise SalmonnError("section `generate:` must be a mapping", source)
    if "generate" in raw and "end_sym" not in gen_raw:
        warnings.append("`generate.end_sym` is missing; evaluate_salmonn.py requires it (using `<|end_of_text|>`)")
    generate = _build(GenerateConfig, "generate", gen_raw, source, warnings)
    check_generate(asdict(generate), source, prefix="generate.")
    if getattr(generate, "do_sample", False):
        warnings.append("`generate.do_sample: true`: the PyTorch reference samples, the engines decode "
                        "deterministically (greedy or beam search), so their texts cannot match")
    datasets = dict(raw.get("datasets") or {})
    for key in datasets:
        if key not in DATASET_FIELDS:
            warnings.append(f"unknown field `datasets.{key}` is ignored")
    run = dict(raw.get("run") or {})
    for key in run:
        if key not in RUN_FIELDS:
            warnings.append(f"unknown field `run.{key}` is ignored")
    for key in (run.get("optims") or {}):
        if key not in OPTIM_FIELDS:
            warnings.append(f"unknown field `run.optims.{key}` is ignored")
    return SalmonnConfig(model=model, generate=generate, datasets=datasets, run=run, path=path, raw=raw, warnings=warnings)


def load_config(path: str | Path, overrides: list[str] | None = None) -> SalmonnConfig:
    """Read and validate a challenge YAML config."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        hint = f" ({path / 'config.yaml'}?)" if (path / "config.yaml").is_file() else ""
        raise SalmonnError(f"is a folder; give the config YAML file{hint}", path)
    if not path.is_file():
        raise SalmonnError("config file not found", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)  # yaml's 0-based position of the problem
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SalmonnError(f"not valid YAML{where} ({first})", path) from None
    if not isinstance(raw, dict):
        raise SalmonnError("the config must be a YAML mapping with a `model:` section", path)
    return parse_config(raw, path, overrides)


MODEL_FILE_FIELDS = ("ckpt", "beats_path", "speech_llama_proj_model")
MODEL_FOLDER_FIELDS = {"llama_path": "LLM", "whisper_path": "Whisper"}


def check_model_files(config: SalmonnConfig) -> SalmonnConfig:
    """Check the files and folders `model:` names before anything loads: at real size Whisper and
    the LLM take minutes to load, so a mistyped `ckpt:` must not be found after them. Raises
    SalmonnError naming the path and its field (no model hub: a hub id is a missing folder);
    returns `config`."""
    for name, what in MODEL_FOLDER_FIELDS.items():
        value = getattr(config.model, name)
        path = config.resolve(value) if value else None
        if path is not None and not path.is_dir():
            problem = "is a file, not a folder" if path.is_file() else "not found (no model hub access: give a local folder)"
            raise SalmonnError(f"{what} folder {problem}; `model.{name}` of {config.path}", path)
    for name in MODEL_FILE_FIELDS:
        value = getattr(config.model, name)
        path = config.resolve(value) if value else None
        if path is not None and not path.is_file():
            problem = "is a folder, not a file" if path.is_dir() else "file not found"
            raise SalmonnError(f"{problem}; `model.{name}` of {config.path}", path)
    return config
