"""Build recipes: data (YAML) loaded into one typed object, saved in full into every bundle.

A recipe says, per component, the precision of its graph and, for the LLM, how its Linear
weights are quantized (bits, group size, GPTQ or RTN, act-order, symmetric, dampening), which
modules are skipped, how calibration data is made, and the parity thresholds `verify` enforces.
Unknown or invalid fields are errors naming the field. Pure Python: the runtime reads it too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from salmonn_export.errors import SalmonnError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
COMPONENTS = ("whisper", "beats", "qformer", "llm")
# int8: ONNX Runtime dynamic quantization of the graph's MatMuls (int8 weights per output channel,
# activations quantized per tensor at run time); for the encoders and the Q-Former, on CPU
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class WeightQuant:
    bits: int = 4
    group_size: int = 128
    method: str = "gptq"  # gptq | rtn
    symmetric: bool = True
    act_order: bool = False
    damp: float = 0.01
    accuracy_level: int = 0  # MatMulNBits compute: 0 = activations' type (a16/a32), 4 = int8 activations (faster on CPU)


@dataclass(frozen=True)
class ComponentRecipe:
    precision: str = "fp32"
    weights: WeightQuant | None = None
    skip_modules: tuple[str, ...] = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class Calibration:
    samples: int = 16
    tasks: tuple[str, ...] = ("asr", "aac")
    teacher_forcing: bool = True
    seed: int = 0
    # audio: each clip through the encoders, Q-Former and prompt wrap (what the LLM sees at run time);
    # text: the same prompts and reference texts with no speech embeddings, as a text-only LLM
    # quantizer calibrates (for measuring what audio conditioning buys)
    source: str = "audio"


@dataclass(frozen=True)
class Thresholds:
    min_speech_cosine: float = 0.9999
    max_first_token_kl: float = 0.1
    min_top1_agreement: float = 0.75
    min_text_exact_match: float = 0.0
    max_wer_delta: float = 1.0


@dataclass(frozen=True)
class TrtSettings:
    fp16: bool = True
    int8: bool = False
    max_batch: int = 8
    max_beats_frames: int = 2998
    workspace_gb: float = 4.0


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    components: dict[str, ComponentRecipe] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)
    thresholds: Thresholds = field(default_factory=Thresholds)
    trt: TrtSettings = field(default_factory=TrtSettings)
    opset: int = 17
    optimize: bool = True
    source: str = ""

    @property
    def llm(self) -> ComponentRecipe:
        return self.components["llm"]

    @property
    def needs_calibration(self) -> bool:
        w = self.llm.weights
        return w is not None and w.method == "gptq"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d


def _section(cls, data: Any, where: str, source: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise SalmonnError(f"recipe field `{where}` must be a mapping", source)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise SalmonnError(f"unknown recipe field `{where}.{key}`", source)
        default = known[key].default
        if isinstance(default, tuple):
            if not isinstance(value, list):
                raise SalmonnError(f"recipe field `{where}.{key}` must be a list", source)
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise SalmonnError(f"recipe field `{where}.{key}` must be true or false", source)
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SalmonnError(f"recipe field `{where}.{key}` must be a number", source)
            if isinstance(default, int) and not isinstance(value, int):
                raise SalmonnError(f"recipe field `{where}.{key}` must be an integer", source)
        elif isinstance(default, str) and not isinstance(value, str):
            raise SalmonnError(f"recipe field `{where}.{key}` must be a string", source)
        kwargs[key] = value
    return cls(**kwargs)


def _component(name: str, data: Any, source: str) -> ComponentRecipe:
    if not isinstance(data, dict):
        raise SalmonnError(f"recipe field `components.{name}` must be a mapping", source)
    extra = set(data) - {"precision", "weights", "skip_modules"}
    if extra:
        raise SalmonnError(f"unknown recipe field `components.{name}.{sorted(extra)[0]}`", source)
    precision = data.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise SalmonnError(f"recipe field `components.{name}.precision` must be one of {PRECISIONS}", source)
    if precision == "int8" and name == "llm":
        raise SalmonnError("recipe field `components.llm.precision: int8`: the LLM is quantized through "
                           "`components.llm.weights` (bits 8, accuracy_level 4 for int8 activations)", source)
    weights = None
    if data.get("weights") is not None:
        if name != "llm":
            raise SalmonnError(f"recipe field `components.{name}.weights`: only the LLM is weight-quantized", source)
        weights = _section(WeightQuant, data["weights"], f"components.{name}.weights", source)
        if weights.bits not in (4, 8):
            raise SalmonnError("recipe field `components.llm.weights.bits` must be 4 or 8", source)
        if weights.method not in ("gptq", "rtn"):
            raise SalmonnError("recipe field `components.llm.weights.method` must be gptq or rtn", source)
        gs = weights.group_size
        if gs < 16 or gs & (gs - 1):
            raise SalmonnError("recipe field `components.llm.weights.group_size` must be a power of two >= 16", source)
        if weights.accuracy_level not in (0, 1, 2, 3, 4):
            raise SalmonnError("recipe field `components.llm.weights.accuracy_level` must be 0-4", source)
        if not weights.symmetric:
            raise SalmonnError("recipe field `components.llm.weights.symmetric: false` is not supported yet", source)
    skip = tuple(data.get("skip_modules", ("lm_head", "embed_tokens")))
    return ComponentRecipe(precision=precision, weights=weights, skip_modules=skip)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise SalmonnError("a recipe must be a YAML mapping", source)
    allowed = {"name", "description", "components", "calibration", "thresholds", "trt", "opset", "optimize"}
    extra = set(data) - allowed
    if extra:
        raise SalmonnError(f"unknown recipe field `{sorted(extra)[0]}`", source)
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise SalmonnError("recipe field `name` is required", source)
    comps = data.get("components") or {}
    if not isinstance(comps, dict):
        raise SalmonnError("recipe field `components` must be a mapping", source)
    unknown = set(comps) - set(COMPONENTS)
    if unknown:
        raise SalmonnError(f"unknown recipe field `components.{sorted(unknown)[0]}`", source)
    components = {name: _component(name, comps.get(name, {}), source) for name in COMPONENTS}
    opset = data.get("opset", 17)
    if not isinstance(opset, int) or not 17 <= opset <= 21:
        raise SalmonnError("recipe field `opset` must be an integer from 17 to 21", source)
    optimize = data.get("optimize", True)
    if not isinstance(optimize, bool):
        raise SalmonnError("recipe field `optimize` must be true or false", source)
    return Recipe(
        name=data["name"], optimize=optimize, description=str(data.get("description", "")), components=components,
        calibration=_calibration(data.get("calibration"), source),
        thresholds=_section(Thresholds, data.get("thresholds"), "thresholds", source),
        trt=_section(TrtSettings, data.get("trt"), "trt", source), opset=opset, source=source,
    )


def _calibration(data: Any, source: str) -> Calibration:
    calibration = _section(Calibration, data, "calibration", source)
    if calibration.source not in ("audio", "text"):
        raise SalmonnError("recipe field `calibration.source` must be audio or text", source)
    return calibration


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Rebuild a recipe saved in a manifest (`Recipe.to_dict()`)."""
    data = dict(data)
    comps = {}
    for name, comp in data.get("components", {}).items():
        comp = dict(comp)
        if comp.get("weights") is None:
            comp.pop("weights", None)
        comps[name] = comp
    data["components"] = comps
    return parse_recipe(data, "<manifest>")


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (`w4a16`) or a user's YAML file."""
    text = str(name_or_path)
    builtins = builtin_recipes()
    if text in builtins:
        path = builtins[text]
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:  # meant as a file, not a recipe name
                raise SalmonnError("recipe file does not exist", path)
            raise SalmonnError(f"unknown recipe `{text}`; built-in recipes: {', '.join(builtins)} (or give a .yaml path)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SalmonnError(f"recipe is not valid YAML ({str(exc).splitlines()[0]})", path) from None
    return parse_recipe(data, str(path))
