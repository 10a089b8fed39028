"""TensorRT engines for the encoder and Q-Former graphs (optional extra `salmonn-export[trt]`).

Uses the `tensorrt` Python API: the ONNX parser, one optimisation profile covering every dynamic
input (ranges from the recipe, recorded in the manifest), fp16 / int8 flags and a timing cache
kept in the bundle. Where TensorRT or a GPU is missing it says why and builds nothing: it never
writes a placeholder engine. (TensorRT cannot be installed on the machines this project is
developed on; this path is for users' GPU machines and is unverified here.)
"""

from __future__ import annotations

from pathlib import Path

from salmonn_export.recipes import TrtSettings


def availability() -> tuple[bool, str]:
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        return False, "the tensorrt Python package is not installed (pip install 'salmonn-export[trt]' with NVIDIA's index)"
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no NVIDIA driver (libcuda.so.1) on this machine"
    return True, "ok"


def profile_ranges(component: str, inputs: dict[str, list], settings: TrtSettings) -> dict[str, tuple]:
    """(min, opt, max) shapes for each input of an encoder/Q-Former graph."""
    max_frames = settings.max_beats_frames
    max_tokens = (max_frames // 16) * 8
    ranges = {}
    for name, shape in inputs.items():
        lo, opt, hi = [], [], []
        for dim in shape:
            if dim == "batch":
                lo.append(1), opt.append(1), hi.append(settings.max_batch)
            elif dim == "frames":
                lo.append(98), opt.append(998), hi.append(max_frames)
            elif dim == "tokens":
                lo.append(48), opt.append(496), hi.append(max_tokens)
            else:
                lo.append(int(dim)), opt.append(int(dim)), hi.append(int(dim))
        ranges[name] = (tuple(lo), tuple(opt), tuple(hi))
    return ranges


def build_engine(onnx_path: Path, engine_path: Path, ranges: dict[str, tuple], settings: TrtSettings,
                 timing_cache: Path) -> dict:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        return {"status": "failed", "reason": "ONNX parser: " + "; ".join(errors)[:500]}
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * (1 << 30)))
    if settings.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.int8:
        return {"status": "failed", "reason": "int8 needs a calibration cache; not supported for encoders yet"}
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in ranges.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return {"status": "failed", "reason": "TensorRT builder returned no engine (see its log)"}
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"status": "built", "file": engine_path.name, "tensorrt": trt.__version__, "fp16": settings.fp16,
            "profiles": {k: [list(s) for s in v] for k, v in ranges.items()}}


def build_trt_engines(bundle: Path, components: dict[str, dict], settings: TrtSettings) -> dict:
    """Engines for whisper_encoder, beats and qformer; the decoder stays on ONNX Runtime."""
    ok, reason = availability()
    if not ok:
        return {"status": "skipped", "reason": reason}
    results = {}
    for name in ("whisper_encoder", "beats", "qformer"):
        comp = components.get(name)
        if comp is None:
            continue
        if comp["precision"] == "int8":  # MatMulInteger graphs: TensorRT takes explicit Q/DQ int8, not these
            results[name] = {"status": "skipped", "reason": "int8 (ONNX Runtime dynamic quantization) graph"}
            continue
        inputs = {i["name"]: i["shape"] for i in comp["inputs"]}
        ranges = profile_ranges(name, inputs, settings)
        results[name] = build_engine(bundle / comp["file"], bundle / f"{name}.engine", ranges, settings,
                                     bundle / "trt_timing.cache")
    return {"status": "built" if all(r["status"] == "built" for r in results.values()) else "partial",
            "engines": results}
