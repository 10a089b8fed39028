"""One generic exporter: any `ExportSpec` → an ONNX file, checked and validated against PyTorch.

The TorchScript-based exporter (opset 17) gives hierarchical, stable node names
(`/model/layers.0/self_attn/q_proj/MatMul`) that quantization uses to find each Linear, and
plain ops that TensorRT parses. Every graph is checked with `onnx.checker` (full check, shape
inference) and then run in ONNX Runtime on fresh inputs of other shapes than the export used.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from salmonn_export.errors import SalmonnError
from salmonn_export.export.specs import ExportSpec


def export_component(spec: ExportSpec, out_dir: Path, opset: int = 17, seed: int = 0) -> Path:
    """Export `spec.wrapper` to `out_dir/spec.filename` (weights as external data)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / spec.filename
    gen = torch.Generator().manual_seed(seed)
    args = spec.dummy(gen)
    # its own folder: past 2 GB (a Whisper-large encoder in fp32) the exporter writes one external file
    # per initializer beside the graph
    raw_dir = out_dir / f".{spec.filename}.raw"
    shutil.rmtree(raw_dir, ignore_errors=True)
    raw_dir.mkdir()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(spec.wrapper, args, str(raw_dir / "model.onnx"), input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=spec.dynamic_axes, opset_version=opset,
                              dynamo=False, do_constant_folding=True)
        model = onnx.load(str(raw_dir / "model.onnx"))
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    save_model(model, path)
    return path


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save with all weights in one `<name>.data` file beside it (deterministic, <2 GB protobuf)."""
    data_name = path.name + ".data"
    if (path.parent / data_name).exists():
        (path.parent / data_name).unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)


def optimize_offline(path: Path) -> dict[str, int]:
    """ONNX Runtime's offline *basic* graph optimisation (constant folding, redundant-node removal):
    provider-independent, so the file stays portable (CPU, CUDA, TensorRT). Returns node counts."""
    import onnxruntime as ort

    before = len(onnx.load(str(path), load_external_data=False).graph.node)
    tmp = path.with_name(f".{path.name}.opt")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", tmp.name + ".data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(str(tmp))
        save_model(model, path)
    finally:
        for f in (tmp, tmp.with_name(tmp.name + ".data")):
            if f.exists():
                f.unlink()
    return {"nodes_before": before, "nodes_after": len(model.graph.node)}


def check_model(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise SalmonnError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0]}", path) from None


def session(path: Path, providers: list[str] | None = None, prepack: bool = True):
    """An ORT session for a check. `prepack=False` keeps constant weights in ORT's read-only map of the
    `.data` file (reclaimable page cache) instead of packed anonymous copies: a fp32 or fp16 3B decoder
    then adds ~0.1 GB of anonymous memory instead of 12.8 GB (CPU ORT casts fp16 weights to fp32 at load)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.intra_op_num_threads = int(os.environ.get("SALMONN_EXPORT_THREADS", "0"))
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    ref = ref.astype(np.float64)
    out = out.astype(np.float64)
    max_abs = float(np.abs(ref - out).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 1.0
    denom = np.linalg.norm(ref) * np.linalg.norm(out)
    cosine = float((ref * out).sum() / denom) if denom else 1.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale else max_abs, "cosine": cosine}


@torch.no_grad()
def validate_component(spec: ExportSpec, path: Path, seed: int = 1, release: Callable[[], None] | None = None,
                       prepack: bool = True) -> dict:
    """Run ORT and PyTorch on fresh inputs; worst case over inputs and outputs.

    Each input reaches ORT in the dtype the graph declares (an fp16 decoder keeps fp16 past
    key/values); PyTorch gets the same values, rounded to that dtype and back. PyTorch runs every
    case first; then `release()` (if given) may free the PyTorch model before ORT opens the graph,
    so the two are never resident together (a 3B fp32 decoder: 6.4 GB of fp16-held torch layers
    plus the graph's weights). `prepack=False` opens the graph without packed weight copies (`session`):
    only for plain MatMul graphs, as the quantized kernels (MatMulNBits at accuracy_level 4, int8
    MatMulInteger) take another code path without their packed weights and would not be the ones
    tested. Raises SalmonnError when an output's shape differs from PyTorch's."""
    gen = torch.Generator().manual_seed(seed)
    graph_inputs = onnx.load(str(path), load_external_data=False).graph.input
    graph_dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph_inputs}
    runs = []
    for args in spec.fresh(gen):
        feeds = {name: a.numpy().astype(graph_dtypes.get(name) or a.numpy().dtype, copy=False)
                 for name, a in zip(spec.input_names, args)}
        args = [torch.from_numpy(feeds[name]).to(a.dtype) for name, a in zip(spec.input_names, args)]
        ref = spec.wrapper(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        runs.append((feeds, [r.numpy() for r in ref], [list(a.shape) for a in args[:2]]))
    if release is not None:
        release()
    sess = session(path, prepack=prepack)
    worst = {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    for feeds, refs, _ in runs:
        outs = sess.run(spec.output_names, feeds)
        for name, r, o in zip(spec.output_names, refs, outs):
            if tuple(r.shape) != tuple(o.shape):
                raise SalmonnError(f"{spec.name}: output `{name}` has shape {o.shape}, PyTorch gives {tuple(r.shape)}", path)
            stats = compare(r, o)
            worst = {"max_abs": max(worst["max_abs"], stats["max_abs"]), "max_rel": max(worst["max_rel"], stats["max_rel"]),
                     "cosine": min(worst["cosine"], stats["cosine"])}
    worst["cases"] = [case for _, _, case in runs]
    worst["tolerance_max_rel"] = spec.max_rel_err
    worst["tolerance_min_cosine"] = spec.min_cosine
    worst["passed"] = worst["max_rel"] <= spec.max_rel_err and worst["cosine"] >= spec.min_cosine
    return worst
