"""`salmonn-export build`: trained SALMONN + recipe → a self-describing engine bundle.

Stages: load the reference → merge LoRA → quantize the LLM (GPTQ on audio-conditioned
calibration, or RTN) → export Whisper, BEATs, Q-Former and the KV-cache decoder to ONNX →
int4/int8 weights as MatMulNBits → fp16 where the recipe asks → validate every graph against
PyTorch → tokenizer, embedding table, mel filters → (TensorRT engines) → manifest. The bundle is
written in a temporary folder beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import logging
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from salmonn_export import __version__
from salmonn_export.bundle import FORMAT_VERSION, MANIFEST, hash_tree, write_json
from salmonn_export.dataset import DataSource
from salmonn_export.errors import SalmonnError
from salmonn_export.export.decoder_graph import build_decoder_graph, switch_accuracy_level
from salmonn_export.export.llm_quantization import quantize_llm
from salmonn_export.export.onnx_export import (
    check_model,
    export_component,
    optimize_offline,
    save_model,
    validate_component,
)
from salmonn_export.export.specs import ExportSpec, beats_spec, decoder_spec, qformer_spec, whisper_spec
from salmonn_export.export.stages import StageLog, build_atomically, model_sections, source_hashes, write_tokenizer
from salmonn_export.model.config import load_config
from salmonn_export.model.salmonn import SALMONN
from salmonn_export.recipes import Recipe
from salmonn_export.transforms.lora import merge_in_place
from salmonn_export.transforms.quant_cache import QuantCache

FP16_MAX_REL = 0.1  # fp16 graphs: judged mainly by cosine (outliers in large logits dominate max error)
FP16_MIN_COSINE = 0.999
# int8 (dynamic) graphs are judged by cosine here (demo Whisper tiny.en on the random validation input:
# 0.9985, while single elements move by up to 0.8 of the largest output: per-tensor activation scales);
# the speech-embedding cosine and the texts on real audio are what `verify` judges against the recipe
INT8_MAX_REL = 1.0
INT8_MIN_COSINE = 0.995
# decoders computing on int8 activations (accuracy_level 4) are validated exactly with fp32 compute
# (accuracy_level 0: the same graph, weights and codes), then switched to 4 and run once more: their
# logits against the level-0 ones on the random validation input were 0.99984 (demo, 4 layers),
# 0.99815 (challenge-1b, 16 layers) but 0.88-0.98 on tiny random models depending on the seed, so
# this floor only catches garbage (a broken kernel, NaNs); `verify` judges the accuracy on audio
INT8_ACTIVATIONS_MIN_COSINE = 0.5


@dataclass
class BuildOptions:
    out: Path
    calib: Path | None = None  # audio folder or annotation .json; None: the config's datasets (choose_data)
    audio_root: Path | None = None  # prefix of `calib`'s annotation paths (`datasets.prefix` style)
    calib_samples: int | None = None
    force: bool = False
    trt: bool = False
    seed: int = 0
    cache_dir: Path | None = None  # quantization cache (transforms.quant_cache); None: off


def _io_signature(path: Path) -> tuple[list[dict], list[dict]]:
    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    return describe(model.graph.input), describe(model.graph.output)


def _to_fp16(path: Path, keep_io_types: bool | list[str] = True) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # The converter needs every value's type (value_info). Its own shape inference serializes the model in
    # memory, which protobuf refuses past 2 GB (the real-size fp32 Whisper encoder is 2.5 GB: "Failed to
    # serialize proto"); onnx's path-based inference reads external data itself and gives the same types.
    inferred = path.with_name(f".{path.name}.inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
        model = onnx.load(str(inferred))  # weights from path's own .data file, beside it
    finally:
        inferred.unlink(missing_ok=True)
    model = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=True)
    wrapped = OnnxModel(model)
    wrapped.topological_sort()  # the converter appends its input casts after their consumers
    save_model(wrapped.model, path)


def _after_gelu(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose input is a GELU's output (a Gelu op, or the exported erf form ending in Mul)."""
    producer = {out: node for node in model.graph.node for out in node.output}

    def is_gelu(name: str, depth: int = 4) -> bool:  # x·0.5·(1 + erf(x/√2)): Mul ← Mul ← Add ← Erf
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type in ("Gelu", "FastGelu", "BiasGelu", "Erf"):
            return True
        return depth > 1 and node.op_type in ("Mul", "Add", "Div") and any(is_gelu(i, depth - 1) for i in node.input)

    return [n.name for n in model.graph.node if n.op_type == "MatMul" and is_gelu(n.input[0])]


def _to_int8(path: Path) -> dict:
    """ONNX Runtime's dynamic quantization of the MatMuls with a constant weight (QInt8, per output
    channel; activations quantized per tensor at run time: DynamicQuantizeLinear + MatMulInteger),
    as Optimum's ORTQuantizer does for CPU. Convolutions stay fp32, and so do the MLP projections fed
    by a GELU: their heavy-tailed inputs lose most to per-tensor int8 (demo Whisper tiny.en on real
    speech: output cosine 0.9976 with them quantized, 0.99946 without). Returns node counts."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kept = _after_gelu(onnx.load(str(path), load_external_data=False))

    tmp_dir = path.parent / f".{path.name}.int8"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    quant_logger = logging.getLogger()  # onnxruntime.quantization warns on the root logger ("pre-processing")
    level = quant_logger.level
    quant_logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(path), str(tmp_dir / path.name), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True,
                         nodes_to_exclude=kept, extra_options={"MatMulConstBOnly": True})
        model = onnx.load(str(tmp_dir / path.name))
    finally:
        quant_logger.setLevel(level)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    save_model(model, path)
    return {"int8_matmuls": sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph.node),
            "fp32_after_gelu": len(kept)}


def _library_versions() -> dict[str, str]:
    import onnxruntime
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def build_bundle(config_path: Path, recipe: Recipe, options: BuildOptions, log: StageLog | None = None) -> dict:
    """Build a bundle; returns the build report (also written as build_report.json)."""
    log = log or StageLog()
    # quantized recipes calibrate on data (RTN's only feeds the KL check, which the ONNX build reports)
    return build_atomically(options.out, options.force, config_path, options.calib, recipe.llm.weights is not None,
                            lambda tmp, calib_data: _build_into(tmp, config_path, recipe, options, log, calib_data),
                            options.audio_root)


def _build_into(bundle: Path, config_path: Path, recipe: Recipe, options: BuildOptions, log: StageLog,
                calib_data: DataSource | None) -> dict:
    torch.manual_seed(options.seed)
    with log.stage("load reference"):
        cfg = load_config(config_path)
        salmonn = SALMONN(cfg, low_memory=True)  # fp16-stored LLM layers stay fp16 in RAM, computed in fp32
    with log.stage("merge LoRA"):
        llm, lora_error = merge_in_place(salmonn)  # no copy of the LLM (12.8 GB for a 3B in fp32)
    weights = recipe.llm.weights
    hashes = source_hashes(cfg)
    quantized = quantize_llm(salmonn, llm, recipe, calib_data, log, calib_samples=options.calib_samples,
                             cache=QuantCache(options.cache_dir), model_hashes=hashes)
    quant, calib_info, quant_eval = quantized.quant, quantized.calibration, quantized.evaluation
    embed_scale = float(salmonn.embed_tokens(torch.arange(min(256, len(salmonn.llama_tokenizer)))).std())
    specs: list[ExportSpec] = [whisper_spec(salmonn)]
    if salmonn.beats is not None:
        specs.append(beats_spec(salmonn))
    specs += [qformer_spec(salmonn), decoder_spec(llm, embed_scale)]
    # everything read from the PyTorch model is taken before the exports: the decoder's validation
    # frees the model (release_torch)
    with log.stage("tokenizer, embeddings, audio front end"):
        write_tokenizer(salmonn.llama_tokenizer, bundle / "tokenizer")
        np.save(bundle / "embed_tokens.npy", llm.get_input_embeddings().weight.detach().float().numpy())
        fe = salmonn.feature_extractor
        np.save(bundle / "mel_filters.npy", np.asarray(fe.mel_filters, dtype=np.float64))
        if salmonn.beats is not None:
            from salmonn_export.model.beats import kaldi_mel_banks, povey_window

            np.save(bundle / "beats_mel_banks.npy", kaldi_mel_banks().numpy())
            np.save(bundle / "beats_window.npy", povey_window().numpy())
    sections = model_sections(cfg, salmonn, llm, lora_error)
    quant_layers = None if quant is None else {"layers": len(quant.layers),
                                               "layer_group_sizes": sorted({q.group_size for q in quant.layers.values()})}

    def release_torch() -> None:
        """Free the PyTorch model (and the quantized codes, already in the graph) before ORT opens the
        decoder: at 3B, fp32/fp16 graphs hold 12.8 GB in ORT, the torch layers 6.4 GB."""
        salmonn.to("meta")
        if quant is not None:
            quant.layers.clear()

    precision_of = {"whisper_encoder": "whisper", "beats": "beats", "qformer": "qformer", "decoder": "llm"}
    components: dict[str, dict] = {}
    for spec in specs:
        recipe_comp = recipe.components[precision_of[spec.name]]
        with log.stage(f"export {spec.name}"):
            extra = {}
            level4 = spec.name == "decoder" and weights is not None and weights.accuracy_level == 4
            if spec.name == "decoder":  # fused graph written layer by layer (weights streamed to .data)
                path = bundle / spec.filename
                extra = build_decoder_graph(llm, path, quant.layers if quant is not None else None,
                                            accuracy_level=0 if level4 else weights.accuracy_level if weights else 0,
                                            float16=recipe_comp.precision == "fp16").as_dict()
            else:
                path = export_component(spec, bundle, opset=recipe.opset, seed=options.seed)
            if recipe_comp.precision == "int8":
                extra.update(_to_int8(path))
                spec.max_rel_err, spec.min_cosine = INT8_MAX_REL, INT8_MIN_COSINE
            if recipe_comp.precision == "fp16":
                if spec.name != "decoder":  # the decoder is written in fp16 (KV cache included) from the start
                    _to_fp16(path)
                spec.max_rel_err, spec.min_cosine = FP16_MAX_REL, FP16_MIN_COSINE
            if recipe.optimize and spec.name != "decoder":
                # the decoder graph is written in its final fused form; ORT's offline pass would hold it
                # in memory twice (a 3B fp32 decoder: killed by the OOM killer at 23.2 GB anonymous RSS)
                extra["graph_optimization"] = optimize_offline(path)
            check_model(path)
        with log.stage(f"validate {spec.name}"):
            last = spec.name == "decoder"  # fp32/fp16 decoders are validated from the mapped file (12.8 GB at 3B)
            validation = validate_component(spec, path, seed=options.seed + 1, release=release_torch if last else None,
                                            prepack=not (last and weights is None))
        if not validation["passed"]:
            raise SalmonnError(f"exported {spec.name} differs from PyTorch: max relative error "
                               f"{validation['max_rel']:.3g} (limit {spec.max_rel_err:g}), cosine "
                               f"{validation['cosine']:.6f} (limit {spec.min_cosine:g})", path)
        if level4:
            with log.stage("decoder to int8 activations"):
                extra["int8_activations"] = switch_accuracy_level(path, spec, 4, INT8_ACTIVATIONS_MIN_COSINE,
                                                                  seed=options.seed + 1)
        inputs, outputs = _io_signature(path)
        components[spec.name] = {
            "file": path.name, "data_file": path.name + ".data", "precision": recipe_comp.precision,
            "inputs": inputs, "outputs": outputs, "validation": validation,
            "bytes": path.stat().st_size + (bundle / (path.name + ".data")).stat().st_size, **extra,
        }
    trt_info = {"status": "not requested"}
    if options.trt:
        with log.stage("TensorRT engines"):
            from salmonn_export.export.tensorrt import build_trt_engines

            trt_info = build_trt_engines(bundle, components, recipe.trt)
    manifest = {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "salmonn-export", "version": __version__},
        "recipe": recipe.to_dict(),
        "source": {"config": str(cfg.path), "sha256": hashes},
        "components": components,
        **sections,
        "audio": {"sample_rate": 16000, "max_seconds": 30, "min_seconds": 1, "resampler": "soxr_hq",
                  "whisper": {"n_fft": fe.n_fft, "hop_length": fe.hop_length, "n_mels": fe.feature_size,
                              "n_samples": fe.n_samples, "mel_filters": "mel_filters.npy"},
                  "beats": None if salmonn.beats is None else {
                      "num_mel_bins": 128, "frame_length_ms": 25, "frame_shift_ms": 10, "scale": 2**15,
                      "fbank_mean": 15.41663, "fbank_std": 6.55582, "patch": salmonn.beats.cfg.input_patch_size,
                      "mel_banks": "beats_mel_banks.npy", "window": "beats_window.npy"}},
        "qformer": {"window": salmonn.window, "stride": salmonn.stride, "speech_tokens": salmonn.speech_tokens},
        "embed_tokens": "embed_tokens.npy",
        "quantization": None if quant is None else {
            "method": weights.method, "bits": weights.bits, "group_size": weights.group_size,
            "act_order": weights.act_order, "symmetric": weights.symmetric, "damp": weights.damp,
            "accuracy_level": weights.accuracy_level,
            **quant_layers,
            "per_layer_error": quant.errors, "calibration": calib_info, "llm_eval_on_calibration": quant_eval},
        "tensorrt": trt_info,
        "library_versions": _library_versions(),
        "seed": options.seed,
    }
    manifest["files"] = hash_tree(bundle)
    manifest["sizes"] = {name: c["bytes"] for name, c in components.items()}
    manifest["sizes"]["embed_tokens"] = (bundle / "embed_tokens.npy").stat().st_size
    write_json(bundle / MANIFEST, manifest)
    report = {"recipe": recipe.name, "seconds": log.seconds, "total_seconds": round(sum(log.seconds.values()), 3),
              "sizes": manifest["sizes"], "bundle_bytes": sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()),
              "validation": {k: {m: v["validation"][m] for m in ("max_abs", "max_rel", "cosine")} for k, v in components.items()},
              "lora_merge_max_abs_logit_diff": lora_error, "quantization_eval": quant_eval, "tensorrt": trt_info,
              "quantization_cache": quantized.cache,
              "warnings": cfg.warnings}
    write_json(bundle / "build_report.json", report)
    return report
