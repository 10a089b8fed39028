"""The PyTorch engine on a lent GPU: inventory, bundles, texts vs the reference, the challenge's protocol.

Run by `benchmarks/gpu/run_gpu_engine.sh` (one run, ~8 minutes budget). Subcommands:

  inventory                       GPU, driver, CUDA, torch/triton/transformers, TensorRT / onnxruntime-gpu / trtexec
  prepare PRESET                  tiny-format model of PRESET + torch bundles (fp32 and w4a16-rtn) under WORK
  system PRESET SYSTEM            one system in its own process (so `max_memory_allocated` is its own lifetime
                                  peak, as the challenge measures it): 10 warm-up + 100 timed protocol iterations,
                                  then greedy texts + last-prompt-position logits on fixed clips
  bandwidth                       device copy bandwidth (bytes read + written per second)
  tensorrt PRESET                 if TensorRT (and onnx/onnxruntime) exist: ONNX fp16 bundle with --trt, checked
  summary                         ratios vs the reference and the issue's targets → gpu_torch_engine.json/.md

SYSTEM: `reference` (eager HF under fp16 autocast, the challenge's setting) or `torch:RECIPE[+enc]` (the
engine: LLM fp16 for fp32 bundles, bf16 with int4 kernels for w4a16 bundles; decode step compiled with
torch.compile(mode="reduce-overhead"), i.e. CUDA graphs; `+enc` also compiles Whisper and the Q-Former).
w4a16-rtn is used because RTN needs no calibration data: its codes have the GPTQ recipes' layout and
group size, so the decode speed is the same. Every result lands in $OUT (the device tool brings it back).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = Path(os.environ.get("OUT", "/tmp/gpu-engine-out"))
WORK = Path(os.environ.get("WORK", "/tmp/gpu-engine-work"))
DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu: a dry run of the same steps on a CPU machine (no timings claimed)
MAX_NEW = 32


def _write(name: str, data) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=1, default=str) + "\n")


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception as exc:  # present but broken: say how
        return f"import failed: {str(exc).splitlines()[0][:120]}"


def inventory() -> dict:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1024**3, 1), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable ({exc})"
    for module in ("triton", "transformers", "tokenizers", "safetensors", "peft", "numpy", "soundfile", "soxr",
                   "tensorrt", "onnx", "onnxruntime", "torchao"):
        info[module] = _version(module)
    if info["onnxruntime"] and not str(info["onnxruntime"]).startswith("import failed"):
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    info["trtexec"] = shutil.which("trtexec")
    info["int4_ops"] = {op: hasattr(torch.ops.aten, op) for op in ("_convert_weight_to_int4pack", "_weight_int4pack_mm")}
    return info


def prepare(preset: str) -> dict:
    from salmonn_export.export.torch_bundle import TorchBuildOptions, build_torch_bundle
    from salmonn_export.model.tiny import write_tiny_salmonn
    from salmonn_export.recipes import load_recipe

    t0 = time.perf_counter()
    folder = write_tiny_salmonn(WORK / preset, preset, 0, force=True)
    out = {"model_seconds": round(time.perf_counter() - t0, 1), "bundles": {}}
    recipes = ("fp32", "w4a16-rtn") if preset == "small" else ("w4a16-rtn",)
    for recipe in recipes:
        t0 = time.perf_counter()
        report = build_torch_bundle(folder / "config.yaml", load_recipe(recipe),
                                    TorchBuildOptions(out=WORK / f"{preset}-torch-{recipe}", force=True))
        out["bundles"][recipe] = {"seconds": round(time.perf_counter() - t0, 1), "sizes": report["sizes"]}
    return out


def clips():
    import numpy as np

    from salmonn_export.model.synth import sound_scene

    rng = np.random.default_rng(0)
    return {"noise_10s": rng.standard_normal(160000), "tone_2s": sound_scene("tone", 2.0).astype(np.float64),
            "chirp_3s": sound_scene("chirp", 3.0, seed=1).astype(np.float64)}


def run_system(preset: str, system: str) -> dict:
    import numpy as np
    import torch

    from salmonn_export.harness.bench import peak_rss_gb, run_protocol
    from salmonn_export.harness.bench_systems import reference_system
    from salmonn_export.runtime.generation import positions_from_mask

    wave = clips()["noise_10s"]
    t0 = time.perf_counter()
    if system == "reference":
        from salmonn_export.model.salmonn import load_salmonn

        sysm = reference_system(WORK / preset / "config.yaml", wave, device=DEVICE)
    else:
        from salmonn_export.harness.bench_torch import torch_engine_system
        from salmonn_export.torch_engine.engine import TorchEngine

        recipe, _, flags = system.split(":", 1)[1].partition("+")
        engine = TorchEngine(WORK / f"{preset}-torch-{recipe}", device=DEVICE, compile_decode=DEVICE == "cuda",
                             compile_encoders="enc" in flags)
        sysm = torch_engine_system(engine.bundle, wave, engine=engine)
    load_s = time.perf_counter() - t0
    warmup, iters = (10, 100) if DEVICE == "cuda" else (1, 2)
    protocol = run_protocol([sysm], wave, warmup=warmup, iters=iters)[sysm.name]
    result = {"system": system, "name": sysm.name, "load_seconds": round(load_s, 1), **protocol,
              "average_memory_usage_gb": torch.cuda.max_memory_allocated() / 1024**3 if DEVICE == "cuda" else peak_rss_gb(),
              "decode_weight_bytes": sysm.decoder_bytes, "kv_bytes_per_token": sysm.kv_bytes_per_token,
              "sizes_mb": sysm.sizes_mb}
    if system != "reference":
        result["engine"] = engine.describe()
    else:  # loaded only now: the peak above is the protocol's own
        model = load_salmonn(WORK / preset / "config.yaml", device=DEVICE)
    # texts and the prompt's last-position logits on fixed clips (greedy, MAX_NEW tokens)
    texts, logits = {}, {}
    for name, clip in clips().items():
        for task in ("asr", "aac"):
            key = f"{name}/{task}"
            if system == "reference":
                batch = model.make_batch([clip], [task])
                texts[key] = model.generate_batch(batch, num_beams=1, max_new_tokens=MAX_NEW)[0][0]
                with torch.inference_mode(), model._autocast():
                    embeds, atts = model.prompt_wrap(model.encode_speech(batch), model.prompts_for([task]))
                    last = model.causal_lm(inputs_embeds=embeds, attention_mask=atts).logits[0, -1]
            else:
                texts[key] = engine.run_waves([clip], [task], num_beams=1, max_new_tokens=MAX_NEW).texts[0]
                speech = engine.encode_speech([clip])
                embeds, mask = engine.prompt_wrap(speech, [task])
                last = engine.prefill(embeds, mask, positions_from_mask(mask), MAX_NEW)[0, -1]
            logits[key] = last.float().cpu().numpy()
    beam = ["noise_10s", "chirp_3s"]
    if system == "reference":
        b = model.make_batch([clips()[k] for k in beam], ["asr", "aac"])
        texts["beam4_batch2"] = model.generate_batch(b, num_beams=4, max_new_tokens=MAX_NEW)[0]
    else:
        texts["beam4_batch2"] = engine.run_waves([clips()[k] for k in beam], ["asr", "aac"], num_beams=4,
                                                 max_new_tokens=MAX_NEW).texts
    result["texts"] = texts
    np.savez(OUT / f"logits_{preset}_{system.replace(':', '_').replace('+', '_')}.npz", **{
        k.replace("/", "__"): v for k, v in logits.items()})
    return result


def bandwidth() -> dict:
    import torch

    if DEVICE != "cuda":
        return {"copy_bytes": 0, "read_write_gb_s": float("nan"), "note": "dry run without a GPU"}
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return {"copy_bytes": n, "read_write_gb_s": 2 * n / best / 1e9}


def tensorrt_check(preset: str) -> dict:
    info = inventory()
    if not info["tensorrt"] or not info["onnx"] or not info["onnxruntime"]:
        return {"status": "not run", "reason": f"tensorrt={info['tensorrt']}, onnx={info['onnx']}, "
                                               f"onnxruntime={info['onnxruntime']} (all three are needed)"}
    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe

    report = build_bundle(WORK / preset / "config.yaml", load_recipe("fp16"),
                          BuildOptions(out=WORK / f"{preset}-onnx-fp16-trt", force=True, trt=True))
    return {"status": "built", "tensorrt": report["tensorrt"], "validation": report["validation"]}


def summary() -> dict:
    import numpy as np

    out = {"inventory": json.loads((OUT / "inventory.json").read_text())}
    bw = json.loads((OUT / "bandwidth.json").read_text()) if (OUT / "bandwidth.json").is_file() else None
    out["bandwidth"] = bw
    presets = {}
    for f in sorted(OUT.glob("system_*.json")):
        r = json.loads(f.read_text())
        presets.setdefault(r["preset"], {})[r["system"]] = r
    targets = []
    for preset, systems in presets.items():
        ref = systems.get("reference")
        rows = {}
        for name, r in systems.items():
            row = {"ttft_ms": r["ttft"]["median"] * 1e3, "tpot_ms": r["tpot"]["median"] * 1e3,
                   "ttft_mean_ms": r["average_ttft_sec"] * 1e3, "tpot_mean_ms": r["average_tpot_sec"] * 1e3,
                   "memory_gb": r["average_memory_usage_gb"], "decode_weight_mb": r["decode_weight_bytes"] / 1e6}
            if bw:
                row["tpot_bound_ms"] = r["decode_weight_bytes"] / (bw["read_write_gb_s"] / 2 * 1e9) * 1e3
                row["tpot_over_bound"] = row["tpot_ms"] / row["tpot_bound_ms"]
            if ref and name != "reference":
                row["tpot_speedup"] = ref["tpot"]["median"] / r["tpot"]["median"]
                row["ttft_speedup"] = ref["ttft"]["median"] / r["ttft"]["median"]
                row["memory_vs_reference"] = r["average_memory_usage_gb"] / ref["average_memory_usage_gb"]
                same = [r["texts"][k] == ref["texts"][k] for k in ref["texts"]]
                row["texts_equal_reference"] = f"{sum(same)}/{len(same)}"
                ref_npz = np.load(OUT / f"logits_{preset}_reference.npz")
                eng_npz = np.load(OUT / f"logits_{preset}_{name.replace(':', '_').replace('+', '_')}.npz")
                cos, top1 = [], []
                for k in ref_npz.files:
                    a, b = ref_npz[k].astype(np.float64), eng_npz[k].astype(np.float64)
                    cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
                    top1.append(bool(a.argmax() == b.argmax()))
                row["prompt_logits_min_cosine"] = min(cos)
                row["prompt_top1_agreement"] = f"{sum(top1)}/{len(top1)}"
            rows[name] = row
        presets[preset] = {"rows": rows, "raw": systems}
        engines = {n: row for n, row in rows.items() if n != "reference" and "tpot_speedup" in row}
        if engines:
            best_tpot = max(engines.items(), key=lambda kv: kv[1]["tpot_speedup"])
            best_ttft = max(engines.items(), key=lambda kv: kv[1]["ttft_speedup"])
            if preset == "small":
                targets.append({"target": "decode step >= 5x faster than eager fp16 reference (small)",
                                "system": best_tpot[0], "value": round(best_tpot[1]["tpot_speedup"], 2),
                                "met": best_tpot[1]["tpot_speedup"] >= 5})
            for n, row in engines.items():
                if preset == "challenge-1b" and "tpot_over_bound" in row:
                    targets.append({"target": "decode within 1.5x of weight-bytes/HBM bound (challenge-1b)",
                                    "system": n, "value": round(row["tpot_over_bound"], 2),
                                    "met": row["tpot_over_bound"] <= 1.5})
            targets.append({"target": f"TTFT >= 2x faster than reference ({preset})", "system": best_ttft[0],
                            "value": round(best_ttft[1]["ttft_speedup"], 2), "met": best_ttft[1]["ttft_speedup"] >= 2})
            for n, row in engines.items():
                targets.append({"target": f"peak memory below reference ({preset})", "system": n,
                                "value": round(row["memory_vs_reference"], 3), "met": row["memory_vs_reference"] < 1})
    expected = ("decode step >= 5x faster than eager fp16 reference (small)",
                "decode within 1.5x of weight-bytes/HBM bound (challenge-1b)",
                "TTFT >= 2x faster than reference (small)", "peak memory below reference (small)")
    for name in expected:
        if not any(t["target"] == name for t in targets):
            targets.append({"target": name, "system": None, "value": None, "met": None,
                            "reason": "not measured in this run (see skipped / errors)"})
    out["presets"] = {p: v["rows"] for p, v in presets.items()}
    out["targets"] = targets
    out["prepare"] = {f.stem: json.loads(f.read_text()) for f in OUT.glob("prepare_*.json")}
    if (OUT / "tensorrt.json").is_file():
        out["tensorrt"] = json.loads((OUT / "tensorrt.json").read_text())
    for name in ("skipped", "errors"):  # lines the shell script appends
        f = OUT / f"{name}.txt"
        out[name] = f.read_text().splitlines() if f.is_file() else []
    return out


def markdown(s: dict) -> str:
    inv = s["inventory"]
    lines = [f"# PyTorch engine on {inv.get('gpu', '?')} (torch {inv['torch']}, CUDA {inv['cuda_runtime']}, "
             f"transformers {inv['transformers']}, triton {inv['triton']})", "",
             f"TensorRT: {inv['tensorrt']}; onnxruntime: {inv['onnxruntime']}; trtexec: {inv['trtexec']}; "
             f"copy bandwidth {s['bandwidth']['read_write_gb_s']:.0f} GB/s (read+write)" if s.get("bandwidth") else "", ""]
    for preset, rows in s["presets"].items():
        lines += [f"## {preset} (batch 1, 10 s noise clip, 10 warm-up + 100 timed, medians)", "",
                  "| system | TTFT ms | TPOT ms | TTFT × | TPOT × | peak GB | TPOT / bound | texts = ref | top-1 | min cos |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            bound = r.get("tpot_over_bound", float("nan"))
            lines.append(f"| {name} | {r['ttft_ms']:.2f} | {r['tpot_ms']:.3f} | {r.get('ttft_speedup', 1):.2f} | "
                         f"{r.get('tpot_speedup', 1):.2f} | {r['memory_gb']:.3f} | {bound:.2f} | "
                         f"{r.get('texts_equal_reference', '-')} | {r.get('prompt_top1_agreement', '-')} | "
                         f"{r.get('prompt_logits_min_cosine', float('nan')):.5f} |")
        lines.append("")
    lines += ["## Targets", "", "| target | system | value | met |", "|---|---|---|---|"]
    verdict = {True: "yes", False: "NO", None: "not measured"}
    lines += [f"| {t['target']} | {t['system']} | {t['value']} | {verdict[t['met']]} |" for t in s["targets"]]
    for key in ("skipped", "errors"):
        if s.get(key):
            lines += ["", f"## {key}", ""] + [f"- {x}" for x in s[key]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("inventory", "prepare", "system", "bandwidth", "tensorrt", "summary"))
    parser.add_argument("args", nargs="*")
    a = parser.parse_args()
    if a.command == "inventory":
        _write("inventory.json", inventory())
    elif a.command == "prepare":
        _write(f"prepare_{a.args[0]}.json", prepare(a.args[0]))
    elif a.command == "system":
        preset, system = a.args
        result = {"preset": preset, **run_system(preset, system)}
        _write(f"system_{preset}_{system.replace(':', '_').replace('+', '_')}.json", result)
        print(system, {k: result[k] for k in ("average_ttft_sec", "average_tpot_sec", "average_memory_usage_gb")})
    elif a.command == "bandwidth":
        _write("bandwidth.json", bandwidth())
    elif a.command == "tensorrt":
        _write("tensorrt.json", tensorrt_check(a.args[0]))
    else:
        s = summary()
        name = "gpu_torch_engine_" + str(s["inventory"].get("gpu", "gpu")).split()[-1].lower()
        _write(f"{name}.json", s)
        (OUT / f"{name}.md").write_text(markdown(s))
        print(markdown(s))


if __name__ == "__main__":
    main()
