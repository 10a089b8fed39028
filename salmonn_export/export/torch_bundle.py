"""`build --target torch`: trained SALMONN + recipe → a bundle for the PyTorch engine (no ONNX).

Stages: load the reference → merge LoRA → quantize the LLM exactly as the ONNX build does (same
calibration, same `quantize_model` call, so the same codes) → write safetensors:
`encoders.safetensors` (Whisper encoder, BEATs, ln_speech/ln_audio, Q-Former, query tokens,
projection; fp32, the reference's own module keys) and `llm.safetensors` (the merged LLM; every
quantized Linear as `<name>.qweight` = the MatMulNBits B layout [N, K/group, group·bits/8] and
`<name>.scales` [N, K/group] fp32, byte for byte what the ONNX bundle's initializers hold), the
Whisper feature-extractor config, the tokenizer, and a manifest whose `target` is `torch` and
whose `torch_engine` section holds the configs needed to rebuild the modules. Imports neither
onnx nor onnxruntime (the lent GPU machine has neither).
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from salmonn_export import __version__
from salmonn_export.bundle import FORMAT_VERSION, MANIFEST, hash_tree, write_json
from salmonn_export.dataset import DataSource
from salmonn_export.export.llm_quantization import quantize_llm
from salmonn_export.export.matmul_nbits import pack_codes
from salmonn_export.export.stages import StageLog, build_atomically, model_sections, write_tokenizer
from salmonn_export.model.config import load_config
from salmonn_export.model.salmonn import SALMONN
from salmonn_export.recipes import Recipe
from salmonn_export.transforms.lora import merge_in_place
from salmonn_export.transforms.quant_cache import QuantCache
from salmonn_export.transforms.quantize import QuantResult

TARGET = "torch"
ENCODER_PREFIXES = ("speech_encoder.", "beats.", "ln_speech.", "ln_audio.", "speech_Qformer.", "speech_query_tokens",
                    "speech_llama_proj.")


@dataclass
class TorchBuildOptions:
    """`build --target torch` options (the ONNX build's BuildOptions lives beside onnx imports)."""

    out: Path
    calib: Path | None = None  # audio folder or annotation .json; None: the config's datasets (choose_data)
    audio_root: Path | None = None  # prefix of `calib`'s annotation paths (`datasets.prefix` style)
    calib_samples: int | None = None
    force: bool = False
    seed: int = 0
    cache_dir: Path | None = None  # quantization cache (transforms.quant_cache); None: off


def llm_tensors(llm: torch.nn.Module, quant: QuantResult | None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The merged LLM's state for `llm.safetensors` and, per quantized Linear, its bits/group/zero."""
    tied = llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    layers = quant.layers if quant is not None else {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in llm.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in layers:
            continue
        tensors[key] = value.detach().float().contiguous().clone()
    info = {}
    for name, q in layers.items():
        packed = pack_codes(q.codes.numpy(), q.bits, q.group_size)
        tensors[f"{name}.qweight"] = torch.from_numpy(packed.copy())
        tensors[f"{name}.scales"] = q.scales.float().contiguous().clone()
        info[name] = {"bits": q.bits, "group_size": q.group_size, "zero_point": q.zero,
                      "shape": list(q.codes.shape)}
    return tensors, info


def build_torch_bundle(config_path: Path, recipe: Recipe, options: TorchBuildOptions, log: StageLog | None = None) -> dict:
    """Build a `target: torch` bundle at `options.out` (atomically); returns the build report (also
    written as build_report.json). Raises SalmonnError for an existing bundle without `force` or
    missing calibration data (chosen as the ONNX build chooses it, before the slow load)."""
    log = log or StageLog()
    # RTN needs no data here (the ONNX build's calibration only feeds its KL report)
    return build_atomically(options.out, options.force, config_path, options.calib, recipe.needs_calibration,
                            lambda tmp, calib_data: _build_into(tmp, config_path, recipe, options, log, calib_data),
                            options.audio_root)


def _build_into(bundle: Path, config_path: Path, recipe: Recipe, options: TorchBuildOptions, log: StageLog,
                calib_data: DataSource | None) -> dict:
    import transformers

    torch.manual_seed(options.seed)
    with log.stage("load reference"):
        cfg = load_config(config_path)
        salmonn = SALMONN(cfg, low_memory=True)  # as the ONNX build: fp16-stored LLM layers computed in fp32
    with log.stage("write encoders"):  # before the merge: afterwards the SALMONN's LLM is the merged one
        encoders = {k: (v.float() if v.is_floating_point() else v).detach().contiguous().clone()
                    for k, v in salmonn.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
        save_file(encoders, str(bundle / "encoders.safetensors"))
        del encoders
    with log.stage("merge LoRA"):
        llm, lora_error = merge_in_place(salmonn)
    # RTN needs no data here: the ONNX build's calibration only feeds its KL check
    quantized = quantize_llm(salmonn, llm, recipe, calib_data, log, calib_samples=options.calib_samples, evaluate=False,
                             cache=QuantCache(options.cache_dir))
    quant, calib_info = quantized.quant, quantized.calibration
    with log.stage("write LLM"):
        tensors, quant_layers = llm_tensors(llm, quant)
        save_file(tensors, str(bundle / "llm.safetensors"))
    with log.stage("tokenizer, feature extractor"):
        write_tokenizer(salmonn.llama_tokenizer, bundle / "tokenizer")
        salmonn.feature_extractor.save_pretrained(str(bundle / "whisper_preprocessor"))
    lcfg = llm.config
    weights = recipe.llm.weights
    manifest = {
        "format_version": FORMAT_VERSION,
        "target": TARGET,
        "tool": {"name": "salmonn-export", "version": __version__},
        "recipe": recipe.to_dict(),
        "source": {"config": str(cfg.path)},
        "components": {},
        "torch_engine": {
            "encoders": "encoders.safetensors", "llm": "llm.safetensors",
            "whisper_config": salmonn.speech_encoder.config.to_dict(),
            "whisper_preprocessor": "whisper_preprocessor",
            "beats_config": None if salmonn.beats is None else asdict(salmonn.beats.cfg),
            "num_query_tokens": int(salmonn.speech_query_tokens.shape[1]),
            "llm_config": lcfg.to_dict(), "tied_embeddings": "lm_head.weight" not in tensors and "lm_head" not in quant_layers,
            "quantized_layers": quant_layers,
        },
        **model_sections(cfg, salmonn, llm, lora_error),
        "qformer": {"window": salmonn.window, "stride": salmonn.stride, "speech_tokens": salmonn.speech_tokens},
        "quantization": None if quant is None else {
            "method": weights.method, "bits": weights.bits, "group_size": weights.group_size,
            "act_order": weights.act_order, "symmetric": weights.symmetric, "damp": weights.damp,
            "layers": len(quant.layers), "layer_group_sizes": sorted({q.group_size for q in quant.layers.values()}),
            "per_layer_error": quant.errors, "calibration": calib_info},
        "library_versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "transformers": transformers.__version__},
        "seed": options.seed,
    }
    manifest["files"] = hash_tree(bundle)
    manifest["sizes"] = {"encoders": (bundle / "encoders.safetensors").stat().st_size,
                         "llm": (bundle / "llm.safetensors").stat().st_size}
    write_json(bundle / MANIFEST, manifest)
    report = {"recipe": recipe.name, "target": TARGET, "seconds": log.seconds,
              "total_seconds": round(sum(log.seconds.values()), 3), "sizes": manifest["sizes"],
              "bundle_bytes": sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()),
              "lora_merge_max_abs_logit_diff": lora_error, "quantization_cache": quantized.cache,
              "warnings": cfg.warnings}
    write_json(bundle / "build_report.json", report)
    return report

