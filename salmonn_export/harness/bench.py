"""`salmonn-export bench`: the challenge's speed protocol, per stage, engines beside the reference.

Challenge protocol (spec 6): one 10 s N(0,1) clip (seeded here), batch 1, W warm-up and N timed
iterations. TTFT = audio front end + encoders + Q-Former + prompt wrap (tokenisation included) +
prefill (engines compute the last position's logits, all that generation reads); TPOT = one
decode step with the KV cache. Warm-ups are discarded. Systems are interleaved inside each
iteration (reference, engine 1, engine 2, ...) so machine noise hits all of them alike, and
ratios are engine / reference from the same run.
Memory: on CPU each system's peak resident memory is measured in a fresh subprocess (the
challenge reports the lifetime peak of `max_memory_allocated`; a shared process cannot separate
systems), plus weight bytes. Roofline: bytes a decode step must read (decoder weights + KV cache)
over the step time, against this machine's multi-thread read bandwidth measured in the same run.
Beam search: decode cost per generated token at 1 and 4 beams (forced lengths, prefill excluded),
beside the batch-1 step, so the cost of the challenge's 4-beam decoding is visible.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHALLENGE_KEYS = ("average_memory_usage_gb", "average_inference_time_sec", "average_ttft_sec", "average_tpot_sec")


@dataclass
class System:
    """What bench needs from a system under test."""

    name: str
    ttft: Callable[[np.ndarray], object]  # wave → state holding the prefill result
    tpot: Callable[[object], None]  # one decode step from that state
    stages: dict[str, Callable[[], None]]
    weight_bytes: int
    decoder_bytes: int
    kv_bytes_per_token: int
    # generate(waves, num_beams, max_new_tokens) -> generated token count (whole pipeline, audio in memory)
    generate: Callable[[list[np.ndarray], int | None, int | None], int] | None = None
    # transcribe(path) -> text: end to end from the audio file
    transcribe: Callable[[str], str] | None = None
    sizes_mb: dict[str, float] | None = None  # weight size by component
    # per_token(num_beams) -> seconds per generated token of a forced-length generation, prefill excluded
    per_token: Callable[[int], float] | None = None


def _summary(times: list[float]) -> dict[str, float]:
    a = np.asarray(times)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "min": float(a.min())}


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """Read bandwidth in GB/s with `threads` threads (default: all CPUs, as the engines run), best of
    `repeats`: each thread takes the max of its slice of a buffer far larger than the caches (numpy
    releases the GIL in the reduction). A decode step reads its weights, so this — not one thread's
    copy bandwidth, which counts writes and leaves cores idle — is the roofline's ceiling.

    The reduction is a max, not a sum: numpy's float32 sum is pairwise and compute-bound (measured
    here: 8.0 GB/s per thread, against 15.7 for max and 27.8 for a BLAS GEMV; 2 threads: sum 16.9,
    max 32.2), so a sum understated the ceiling 2x and put fp32 decoders at "166 %" of it."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    data = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, chunks))
            best = min(best, time.perf_counter() - t0)
    return data.nbytes / best / 1e9


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    fork+exec, so a fresh subprocess would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1024**3
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1024**3


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("numpy", "onnxruntime", "torch", "transformers"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", "?")
    info["libraries"] = versions
    return info


def run_protocol(systems: list[System], wave: np.ndarray, warmup: int, iters: int,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Interleaved TTFT/TPOT per system; returns raw timings and challenge-style summaries."""
    ttft = {s.name: [] for s in systems}
    tpot = {s.name: [] for s in systems}
    total = warmup + iters
    for it in range(total):
        for s in systems:
            t0 = time.perf_counter()
            state = s.ttft(wave)
            t1 = time.perf_counter()
            s.tpot(state)
            t2 = time.perf_counter()
            if it >= warmup:
                ttft[s.name].append(t1 - t0)
                tpot[s.name].append(t2 - t1)
        if progress:
            progress(it + 1, total)
    out = {}
    for s in systems:
        inference = [a + b for a, b in zip(ttft[s.name], tpot[s.name])]
        out[s.name] = {
            "average_inference_time_sec": float(np.mean(inference)),
            "average_ttft_sec": float(np.mean(ttft[s.name])),
            "average_tpot_sec": float(np.mean(tpot[s.name])),
            "ttft": _summary(ttft[s.name]), "tpot": _summary(tpot[s.name]), "inference": _summary(inference),
            "iterations": len(inference), "warmup_discarded": warmup,
        }
    return out


def run_stages(systems: list[System], warmup: int, iters: int) -> dict:
    """Per-stage medians, interleaved the same way."""
    results = {s.name: {k: [] for k in s.stages} for s in systems}
    for it in range(warmup + iters):
        for s in systems:
            for stage, fn in s.stages.items():
                t0 = time.perf_counter()
                fn()
                if it >= warmup:
                    results[s.name][stage].append(time.perf_counter() - t0)
    return {name: {k: _summary(v) for k, v in stages.items()} for name, stages in results.items()}


def run_generation(systems: list[System], wave: np.ndarray, clip: str | None, batch_sizes: list[int],
                   new_tokens: int, repeats: int) -> dict:
    """Throughput (clips/s, tokens/s) per batch size with greedy decoding of `new_tokens`; full-answer
    beam search tokens/s with the model's own settings; end-to-end latency of a real clip. Best of
    `repeats`, systems interleaved."""
    out: dict = {s.name: {"throughput": {}, "beam_search": None, "end_to_end_clip": None} for s in systems}
    for b in batch_sizes:
        best = {s.name: (float("inf"), 0) for s in systems}
        for _ in range(repeats):
            for s in systems:
                t0 = time.perf_counter()
                tokens = s.generate([wave] * b, 1, new_tokens)
                dt = time.perf_counter() - t0
                if dt < best[s.name][0]:
                    best[s.name] = (dt, tokens)
        for s in systems:
            dt, tokens = best[s.name]
            out[s.name]["throughput"][str(b)] = {"seconds": dt, "clips_per_s": b / dt, "tokens_per_s": tokens / dt,
                                                 "generated_tokens": tokens}
    for _ in range(repeats):
        for s in systems:
            if s.per_token is None:
                continue
            for beams in (1, 4):
                dt = s.per_token(beams)
                per = out[s.name].setdefault("decode_per_token_ms", {})
                per[str(beams)] = min(per.get(str(beams), float("inf")), 1000 * dt)
    for s in systems:
        t0 = time.perf_counter()
        tokens = s.generate([wave], None, None)
        dt = time.perf_counter() - t0
        out[s.name]["beam_search"] = {"seconds": dt, "generated_tokens": tokens, "tokens_per_s": tokens / dt}
        if clip and s.transcribe:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                s.transcribe(clip)
                times.append(time.perf_counter() - t0)
            out[s.name]["end_to_end_clip"] = {"clip": clip, "seconds": min(times)}
    return out


def plot(result: dict, path: Path) -> str | None:
    """Bar charts of TTFT/TPOT/peak memory per system; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    names = list(result["protocol"])
    panels = [("TTFT (s)", [result["protocol"][n]["average_ttft_sec"] for n in names]),
              ("TPOT (s)", [result["protocol"][n]["average_tpot_sec"] for n in names]),
              ("peak RSS (GB)", [(result["memory"].get(n) or {}).get("average_memory_usage_gb") or 0 for n in names])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, values) in zip(axes, panels):
        ax.bar(range(len(names)), values, color=["#777"] + ["#2a7"] * (len(names) - 1))
        ax.set_xticks(range(len(names)), [n.replace("engine:", "") for n in names], rotation=30, ha="right")
        ax.set_title(title)
    fig.suptitle(f"salmonn-export bench — {result['machine'].get('cpu', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def ratios(protocol: dict, reference: str) -> dict:
    """engine / reference for every timing (below 1 means faster than the reference)."""
    if reference not in protocol:
        return {}
    ref = protocol[reference]
    out = {}
    for name, r in protocol.items():
        if name == reference:
            continue
        out[name] = {k: r[k] / ref[k] for k in ("average_inference_time_sec", "average_ttft_sec", "average_tpot_sec")}
        out[name]["median_tpot"] = r["tpot"]["median"] / ref["tpot"]["median"]
        out[name]["median_ttft"] = r["ttft"]["median"] / ref["ttft"]["median"]
    return out


def roofline(system: System, tpot_seconds: float, context_tokens: int, bandwidth_gbs: float) -> dict:
    moved = system.decoder_bytes + system.kv_bytes_per_token * context_tokens
    achieved = moved / tpot_seconds / 1e9
    return {"bytes_per_step": moved, "achieved_gbs": achieved, "machine_gbs": bandwidth_gbs,
            "fraction_of_roofline": achieved / bandwidth_gbs}


def measure_memory_subprocess(kind: str, target: str, seconds: float, device: str = "cpu") -> dict:
    """Peak memory of one system alone: load + 3 protocol iterations in a fresh interpreter."""
    code = (
        "import json,sys; from salmonn_export.harness.bench_systems import memory_probe; "
        f"print(json.dumps(memory_probe({kind!r}, {target!r}, {seconds!r}, {device!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_isolated_subprocess(kind: str, target: str, seconds: float, device: str, warmup: int, iters: int,
                            stage_iters: int, seed: int) -> dict:
    """`bench_systems.isolated_probe` in a fresh interpreter; raises SalmonnError with its last
    error line when it fails (out of memory shows as the kernel's kill, exit -9)."""
    from salmonn_export.errors import SalmonnError

    args = (kind, target, seconds, device, warmup, iters, stage_iters, seed)
    code = ("import json; from salmonn_export.harness.bench_systems import isolated_probe; "
            f"print(json.dumps(isolated_probe(*{args!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise SalmonnError(f"bench of {kind} {target} alone failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    lines = ["# salmonn-export bench", "", f"machine: {result['machine'].get('cpu', '?')}, {result['machine']['cpus']} cpus; "
             f"audio {result['settings']['audio_seconds']} s, warm-up {result['settings']['warmup']}, "
             f"iterations {result['settings']['iters']}", "",
             "| system | TTFT mean (s) | TPOT mean (s) | TPOT median (s) | inference (s) | peak memory (GB) | weights (MB) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["protocol"].items():
        peak = (result["memory"].get(name) or {}).get("average_memory_usage_gb")
        peak_text = f"{peak:.3f}" if isinstance(peak, (int, float)) else "n/a"
        lines.append(f"| {name} | {r['average_ttft_sec']:.4f} | {r['average_tpot_sec']:.4f} | {r['tpot']['median']:.4f} | "
                     f"{r['average_inference_time_sec']:.4f} | {peak_text} | {result['weights_mb'][name]:.1f} |")
    if result["settings"].get("isolated"):
        lines += ["", "One process per system, one after another (`--isolate`): " + " → ".join(result["settings"]["order"])]
        if result.get("reference_drift"):
            d = result["reference_drift"]
            lines.append(f"The reference's second run / first: TTFT ×{d['average_ttft_sec']:.3f}, TPOT "
                         f"×{d['average_tpot_sec']:.3f} (the machine's drift over the run; ratios use the first).")
    if result["ratios"]:
        lines += ["", "| engine / reference | TTFT | TPOT | inference | median TPOT |", "|---|---|---|---|---|"]
        for name, r in result["ratios"].items():
            lines.append(f"| {name} | {r['average_ttft_sec']:.3f} | {r['average_tpot_sec']:.3f} | "
                         f"{r['average_inference_time_sec']:.3f} | {r['median_tpot']:.3f} |")
    lines += ["", "| system | stage | median (ms) |", "|---|---|---|"]
    for name, stages in result["stages"].items():
        for stage, s in stages.items():
            lines.append(f"| {name} | {stage} | {1000 * s['median']:.2f} |")
    if result.get("generation"):
        sizes = sorted({b for g in result["generation"].values() for b in g["throughput"]}, key=int)
        lines += ["", "| system | " + " | ".join(f"batch {b} clips/s (tok/s)" for b in sizes)
                  + " | beam search tok/s | clip end to end (s) |", "|---" * (len(sizes) + 3) + "|"]
        for name, g in result["generation"].items():
            cells = [f"{g['throughput'][b]['clips_per_s']:.2f} ({g['throughput'][b]['tokens_per_s']:.0f})" for b in sizes]
            e2e = g["end_to_end_clip"]["seconds"] if g["end_to_end_clip"] else float("nan")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {g['beam_search']['tokens_per_s']:.1f} | {e2e:.3f} |")
        per = {n: g["decode_per_token_ms"] for n, g in result["generation"].items() if g.get("decode_per_token_ms")}
        if per:
            lines += ["", "| system | batch-1 step median (ms) | 1 beam ms/token | 4 beams ms/token "
                      "| 4 beams / 4 batch-1 steps |", "|---|---|---|---|---|"]
            for name, p in per.items():
                step = 1000 * result["protocol"][name]["tpot"]["median"]
                lines.append(f"| {name} | {step:.2f} | {p['1']:.2f} | {p['4']:.2f} | {p['4'] / (4 * step):.2f} |")
    lines += ["", f"memory bandwidth (read, all threads): {result['bandwidth_gbs']:.1f} GB/s", "",
              "| system | bytes / decode step | achieved GB/s | fraction of roofline |", "|---|---|---|---|"]
    for name, r in result["roofline"].items():
        lines.append(f"| {name} | {r['bytes_per_step'] / 1e6:.1f} MB | {r['achieved_gbs']:.2f} | "
                     f"{r['fraction_of_roofline']:.2%} |")
    return "\n".join(lines) + "\n"


def run_isolated(config: Path | None, bundles: list[Path], audio_seconds: float, device: str, warmup: int,
                 iters: int, stage_iters: int, seed: int, console=None) -> dict:
    """`bench --isolate`: each system alone in its own process (`run_isolated_subprocess`), in the order
    reference, engines, reference again; ratios against the first reference run, with the second
    run's drift reported. `config` None: engines only. `console`: a rich Console for progress lines.
    Raises SalmonnError when a system's process fails (out of memory included)."""
    from types import SimpleNamespace

    from rich.progress import Progress

    order = [("reference", str(config))] if config else []
    order += [("engine", str(b)) for b in bundles]
    order += [("reference", str(config))] if config and bundles else []
    runs = []
    with Progress(console=console, transient=True) as progress:
        task_id = progress.add_task("systems, one process each", total=len(order))
        for kind, target in order:
            progress.console.print(f"{kind} {target} alone", highlight=False)
            runs.append(run_isolated_subprocess(kind, target, audio_seconds, device, warmup, iters, stage_iters, seed))
            progress.update(task_id, advance=1)
    drift = None
    if config and bundles:
        first, again = runs[0]["protocol"], runs.pop()["protocol"]
        drift = {k: again[k] / first[k] for k in ("average_ttft_sec", "average_tpot_sec")}
    names: set[str] = set()
    for run, (_, target) in zip(runs, order):
        if run["name"] in names:
            run["name"] = f"{run['name']}@{target}"
        names.add(run["name"])
    protocol = {r["name"]: r["protocol"] for r in runs}
    for r in runs:
        protocol[r["name"]]["average_memory_usage_gb"] = r["memory"]["average_memory_usage_gb"]
    bandwidth = memory_bandwidth_gbs()
    return {
        "settings": {"audio_seconds": audio_seconds, "warmup": warmup, "iters": iters, "stage_iters": stage_iters,
                     "seed": seed, "batch": 1, "device": device, "isolated": True, "order": [t for _, t in order]},
        "machine": machine(), "protocol": protocol, "ratios": ratios(protocol, "reference"),
        "reference_drift": drift, "stages": {r["name"]: r["stages"] for r in runs},
        "memory": {r["name"]: r["memory"] for r in runs}, "bandwidth_gbs": bandwidth, "generation": None,
        "weights_mb": {r["name"]: r["weight_bytes"] / 1e6 for r in runs},
        "sizes_mb_by_component": {r["name"]: r["sizes_mb"] for r in runs},
        "decoder_weight_mb": {r["name"]: r["decoder_bytes"] / 1e6 for r in runs},
        "roofline": {r["name"]: roofline(SimpleNamespace(decoder_bytes=r["decoder_bytes"],
                                                         kv_bytes_per_token=r["kv_bytes_per_token"]),
                                         r["protocol"]["tpot"]["median"], 100, bandwidth) for r in runs},
    }
