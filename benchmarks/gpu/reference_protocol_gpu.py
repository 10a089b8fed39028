"""The challenge's efficiency protocol for the PyTorch reference on a GPU (run once on a lent GPU).

evaluate_efficiency_salmonn.py as the spec describes it: one 10 s N(0,1) clip at batch 1, 10 warm-up
and 100 timed iterations, fp16 autocast with an fp16 LLM, TTFT = encoders + prompt wrap + prefill,
TPOT = one decode step, memory = lifetime `torch.cuda.max_memory_allocated` (never reset).
Writes $OUT/reference_protocol_<preset>.json.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from salmonn_export.harness.bench import machine, run_protocol  # noqa: E402
from salmonn_export.harness.bench_systems import reference_system  # noqa: E402
from salmonn_export.model.tiny import write_tiny_salmonn  # noqa: E402

out_dir = Path(os.environ.get("OUT", "/tmp/gpu-out"))
out_dir.mkdir(parents=True, exist_ok=True)
for preset in sys.argv[1:] or ["small"]:
    folder = write_tiny_salmonn(f"/tmp/{preset}-protocol", preset, 0, force=True)
    wave = np.random.default_rng(0).standard_normal(160000)
    system = reference_system(folder / "config.yaml", wave, device="cuda")
    result = run_protocol([system], wave, warmup=10, iters=100)["reference"]
    result["average_memory_usage_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    result["device"] = torch.cuda.get_device_name(0)
    result["torch"] = torch.__version__
    result["machine"] = machine()
    print(preset, json.dumps({k: result[k] for k in ("average_ttft_sec", "average_tpot_sec",
                                                    "average_inference_time_sec", "average_memory_usage_gb")}))
    (out_dir / f"reference_protocol_{preset}.json").write_text(json.dumps(result, indent=1))
