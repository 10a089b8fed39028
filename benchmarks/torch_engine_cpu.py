"""PyTorch engine vs the PyTorch reference on CPU (informative: the target is the GPU).

The `small` preset, the challenge's protocol at batch 1 (one 10 s N(0,1) clip, seeded; TTFT =
encoders + prompt wrap + prefill, TPOT = one decode step), systems interleaved in one process:
the reference (HF eager, fp32), the torch engine fp32 and the torch engine int4 (w4a16-rtn: RTN
needs no calibration data; its codes have the GPTQ layout, so the decode speed is the same).
Writes benchmarks/results/torch_engine_cpu_<preset>.json and .md.

    nice -n 10 .venv/bin/python benchmarks/torch_engine_cpu.py [--preset small] [--warmup 3] [--iters 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from salmonn_export.export.torch_bundle import TorchBuildOptions, build_torch_bundle  # noqa: E402
from salmonn_export.harness.bench import machine, run_protocol  # noqa: E402
from salmonn_export.harness.bench_systems import reference_system  # noqa: E402
from salmonn_export.harness.bench_torch import torch_engine_system  # noqa: E402
from salmonn_export.model.tiny import write_tiny_salmonn  # noqa: E402
from salmonn_export.recipes import load_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared, oversubscribed machine 2 OpenMP threads wait on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="torch-engine-cpu-"))
    folder = write_tiny_salmonn(work / args.preset, args.preset, 0)
    bundles = {}
    for recipe in ("fp32", "w4a16-rtn"):
        bundles[recipe] = work / f"torch-{recipe}"
        build_torch_bundle(folder / "config.yaml", load_recipe(recipe), TorchBuildOptions(out=bundles[recipe]))
    wave = np.random.default_rng(0).standard_normal(160000)
    systems = [reference_system(folder / "config.yaml", wave)]
    systems += [torch_engine_system(bundles[r], wave, device="cpu", compile_decode=False) for r in bundles]
    protocol = run_protocol(systems, wave, args.warmup, args.iters)
    ref = protocol["reference"]
    rows = {}
    for s in systems:
        p = protocol[s.name]
        rows[s.name] = {"ttft_ms": p["ttft"]["median"] * 1e3, "tpot_ms": p["tpot"]["median"] * 1e3,
                        "ttft_speedup": ref["ttft"]["median"] / p["ttft"]["median"],
                        "tpot_speedup": ref["tpot"]["median"] / p["tpot"]["median"],
                        "decode_weight_mb": s.decoder_bytes / 1e6}
    result = {"preset": args.preset, "device": "cpu", "threads": torch.get_num_threads(), "warmup": args.warmup,
              "iters": args.iters, "protocol": protocol, "summary": rows, "machine": machine(),
              "note": "CPU, shared machine: informative only; the engine's targets are on the GPU"}
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"torch_engine_cpu_{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# PyTorch engine vs reference on CPU ({args.preset}, batch 1, {args.iters} timed after {args.warmup} warm-up)",
             "", f"{torch.get_num_threads()} torch threads on {machine().get('cpu', '?')}; medians; informative only.", "",
             "| system | TTFT ms | TPOT ms | TTFT speed-up | TPOT speed-up | decode weights MB |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | {r['ttft_speedup']:.2f}× | "
                     f"{r['tpot_speedup']:.2f}× | {r['decode_weight_mb']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
