"""How close ONNX Runtime's CPU kernels alone come to the read-bandwidth roofline (issue 18).

One decode step of `challenge-1b` reads every weight once. This times each weight-bearing kernel
alone at batch 1 (the decode shape), 16 nodes with their own weights per layer shape (read cold,
as in the decoder; one node for the head), for the Llama-3.2-1B matrix shapes
(fused q/k/v, o, fused gate/up, down, the tied 128k head) in the formats our recipes use:
MatMulNBits int4 (block 32 and 128; accuracy_level 4 = int8 activations, 0 = fp32), int8
MatMulNBits, and fp32 MatMul. Achieved GB/s = bytes the kernel must read (codes + scales, or fp32
weights) / median time; the fraction is of the machine's multi-thread read bandwidth, measured
in the same run (the probe `bench` uses). If the kernel alone stays at ~55 % while fp32 MatMul
reaches ~90 %, the int4 gap is the kernel's, not our graph's.

    .venv/bin/python benchmarks/peers/kernel_roofline.py --out benchmarks/results/kernel_roofline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from salmonn_export.harness.bench import memory_bandwidth_gbs  # noqa: E402

# Llama-3.2-1B: hidden 2048, 32/8 heads of 64, MLP 8192, vocab 128,256 (+ [PAD])
SHAPES = {"qkv (2048→3072)": (2048, 3072), "o (2048→2048)": (2048, 2048), "gate_up (2048→16384)": (2048, 16384),
          "down (8192→2048)": (8192, 2048), "lm_head (2048→128257)": (2048, 128257)}
PER_LAYER = ("qkv (2048→3072)", "o (2048→2048)", "gate_up (2048→16384)", "down (8192→2048)")
LAYERS = 16


def kernel_graph(k: int, n: int, fmt: str, copies: int, rng: np.random.Generator, path: Path) -> int:
    """Write to `path` (weights in `path.data`: fp32 gate/up passes 2 GB) a model of `copies`
    independent nodes, each with its own weights as the 16 layers have (read cold from memory, not
    from cache); returns the weight bytes one node reads."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])
    nodes, inits, outputs = [], [], []
    for i in range(copies):
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 1, n]))
        if fmt == "fp32":
            w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"matmul{i}"))
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nbytes = w.nbytes
        else:  # "int4-b32-l4": bits, block size, accuracy level
            bits, block, level = int(fmt[3]), int(fmt.split("-b")[1].split("-")[0]), int(fmt.split("-l")[1])
            packed = rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8)
            scales = (rng.random((n, k // block), dtype=np.float32) * 0.01).astype(np.float32)
            nodes.append(helper.make_node("MatMulNBits", ["x", f"b{i}", f"s{i}"], [f"y{i}"], name=f"matmul{i}",
                                          domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                          accuracy_level=level))
            inits += [numpy_helper.from_array(packed, f"b{i}"), numpy_helper.from_array(scales, f"s{i}")]
            nbytes = packed.nbytes + scales.nbytes
    graph = helper.make_graph(nodes, "kernel", [x], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return nbytes


def time_kernel(model: Path, k: int, threads: int, repeats: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, k), dtype=np.float32)
    for _ in range(5):
        sess.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results path stem (.json and .md written)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--formats", nargs="+", default=["int4-b32-l4", "int4-b128-l4", "int4-b32-l0", "int8-b32-l4", "fp32"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    bandwidth = [memory_bandwidth_gbs() * 1e9]
    rows = []
    for fmt in args.formats:
        for shape, (k, n) in SHAPES.items():
            copies = 1 if shape.startswith("lm_head") else LAYERS
            with tempfile.TemporaryDirectory() as tmp:
                nbytes = kernel_graph(k, n, fmt, copies, rng, Path(tmp) / "kernel.onnx")
                seconds = time_kernel(Path(tmp) / "kernel.onnx", k, args.threads, args.repeats) / copies
            rows.append({"format": fmt, "shape": shape, "bytes": nbytes, "ms": seconds * 1e3, "gb_s": nbytes / seconds / 1e9})
            print(f"{fmt:14s} {shape:24s} {nbytes / 1e6:8.1f} MB {seconds * 1e3:8.3f} ms {nbytes / seconds / 1e9:6.1f} GB/s",
                  flush=True)
    bandwidth.append(memory_bandwidth_gbs() * 1e9)
    peak = max(bandwidth)
    step = {}
    for fmt in args.formats:
        by = {r["shape"]: r for r in rows if r["format"] == fmt}
        secs = LAYERS * sum(by[s]["ms"] for s in PER_LAYER) / 1e3 + by["lm_head (2048→128257)"]["ms"] / 1e3
        nbytes = LAYERS * sum(by[s]["bytes"] for s in PER_LAYER) + by["lm_head (2048→128257)"]["bytes"]
        step[fmt] = {"ms": secs * 1e3, "bytes": nbytes, "fraction_of_roofline": nbytes / secs / peak}
    for r in rows:
        r["fraction_of_roofline"] = r["gb_s"] * 1e9 / peak
    result = {"threads": args.threads, "repeats": args.repeats, "read_bandwidth_gb_s": [b / 1e9 for b in bandwidth],
              "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "kernels": rows,
              "challenge_1b_step_from_kernels": step}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# ONNX Runtime CPU kernels alone vs the read roofline (challenge-1b shapes, batch 1)", "",
             f"`benchmarks/peers/kernel_roofline.py`, {args.threads} threads, median of {args.repeats}; ORT {ort.__version__}; "
             f"read bandwidth {', '.join(f'{b / 1e9:.1f}' for b in bandwidth)} GB/s (before, after; the larger is "
             "the roofline).", "",
             "| format | matrix | MB read | ms | GB/s | of roofline |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['format']} | {r['shape']} | {r['bytes'] / 1e6:.1f} | {r['ms']:.3f} | {r['gb_s']:.1f} | "
              f"{100 * r['fraction_of_roofline']:.0f} % |" for r in rows]
    lines += ["", "A decode step's weight kernels alone (16 layers + head; no attention, norms or plumbing):", "",
              "| format | ms | MB | of roofline |", "|---|---:|---:|---:|"]
    lines += [f"| {f} | {s['ms']:.1f} | {s['bytes'] / 1e6:.0f} | {100 * s['fraction_of_roofline']:.0f} % |"
              for f, s in step.items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
