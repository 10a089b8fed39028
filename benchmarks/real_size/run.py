"""Real-size builds on this machine: wall time and peak RSS per stage and recipe, bundle sizes,
then `bench` and `verify` of each bundle. Resumable: every finished step is appended to
`benchmarks/results/<preset>.json` (preset `challenge-1b` → `challenge_1b.json`) and skipped on
the next run; a bundle already on disk is not rebuilt. Run it in the background:

    nohup nice -n 5 .venv/bin/python benchmarks/real_size/run.py --preset challenge-1b \
        --recipes w4a16 fp32 > /work/realsize/run-1b.log 2>&1 &

Models, bundles and the quantization cache (ROOT/quant-cache: calibration, log-probs and GPTQ layers,
so recipes sharing a weight format quantize once and an interrupted build resumes) live outside the
repo (`--root`, default /work/realsize): the preset folder is
written there first (`salmonn-export tiny ROOT/PRESET --preset PRESET`) when missing. RSS is
sampled every 0.2 s with psutil in the process doing the work (one child process per step, so
peaks do not carry over) and attributed to the stage running at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
CLI = [str(REPO / ".venv" / "bin" / "salmonn-export")]


def _anon(info) -> int:
    """Anonymous resident bytes (RSS less file-backed and shared pages: psutil's `shared` on Linux).
    ORT maps a graph's `.data` file read-only; those pages count in RSS but the kernel can drop them,
    so the memory bound is judged on this figure, and RSS is reported beside it."""
    return info.rss - getattr(info, "shared", 0)


class RssSampler:
    """Peak RSS and peak anonymous RSS (bytes) of this process, overall and per current stage name."""

    def __init__(self, period: float = 0.2):
        self.proc = psutil.Process()
        self.stage = "start"
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self.peak = 0
        self.anon_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            info = self.proc.memory_info()
            rss, anon = info.rss, _anon(info)
            self.peak, self.anon_peak = max(self.peak, rss), max(self.anon_peak, anon)
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
            self.anon_peaks[self.stage] = max(self.anon_peaks.get(self.stage, 0), anon)
            time.sleep(period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _build_one(config: Path, recipe_name: str, out: Path, calib: Path | None, fragment: Path, cache_dir: Path) -> None:
    """Child process: one build, timed and sampled; writes its record to `fragment`."""
    from salmonn_export.export.build import BuildOptions, StageLog, build_bundle
    from salmonn_export.recipes import load_recipe

    t0 = time.perf_counter()
    with RssSampler() as rss:
        def on_stage(name: str) -> None:
            rss.stage = name
            print(f"[{time.perf_counter() - t0:8.1f}s rss {rss.proc.memory_info().rss / 2**30:5.2f} GiB, peak so far "
                  f"{rss.peak / 2**30:5.2f} GiB in {max(rss.peaks, key=rss.peaks.get, default='-')}] {name}", flush=True)

        def on_progress(name: str, done: int, total: int) -> None:
            print(f"    {done}/{total} {name} (rss {rss.proc.memory_info().rss / 2**30:.2f} GiB)", flush=True)

        log = StageLog(on_stage=on_stage, on_progress=on_progress)
        options = BuildOptions(out=out, calib=calib, force=True, cache_dir=cache_dir)
        report = build_bundle(config, load_recipe(recipe_name), options, log)
    record = {
        "recipe": recipe_name, "wall_seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(rss.peak / 2**30, 2), "peak_anon_rss_gib": round(rss.anon_peak / 2**30, 2),
        "stages": {name: {"seconds": secs, "peak_rss_gib": round(rss.peaks.get(name, 0) / 2**30, 2),
                          "peak_anon_rss_gib": round(rss.anon_peaks.get(name, 0) / 2**30, 2)}
                   for name, secs in report["seconds"].items()},
        "sizes_bytes": report["sizes"], "bundle_bytes": report["bundle_bytes"],
        "validation": report["validation"], "quantization_eval": report["quantization_eval"],
        "lora_merge_max_abs_logit_diff": report["lora_merge_max_abs_logit_diff"], "bundle": str(out),
        "quantization_cache": report.get("quantization_cache"),
    }
    fragment.write_text(json.dumps(record, indent=1))


def _timed(cmd: list[str], log_path: Path) -> dict:
    """Run a CLI command, sampling the child's RSS; returns wall time, peak RSS, exit code."""
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        peak = anon_peak = 0
        while proc.poll() is None:
            try:
                info = ps.memory_info()
            except psutil.NoSuchProcess:
                break
            peak, anon_peak = max(peak, info.rss), max(anon_peak, _anon(info))
            time.sleep(0.2)
    return {"rc": proc.returncode, "wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak / 2**30, 2),
            "peak_anon_rss_gib": round(anon_peak / 2**30, 2)}


def _wait_for_ram(gib: float) -> None:
    """The machine is shared: wait until `gib` of RAM is available before a big step."""
    while psutil.virtual_memory().available < gib * 2**30:
        print(f"waiting for {gib} GiB free RAM ({psutil.virtual_memory().available / 2**30:.1f} now)", flush=True)
        time.sleep(30)


def _results_path(preset: str) -> Path:
    return RESULTS / f"{preset.replace('-', '_')}.json"


def _load(preset: str) -> dict:
    path = _results_path(preset)
    return json.loads(path.read_text()) if path.is_file() else {"preset": preset, "machine": _machine(), "steps": {}}


def _record(preset: str, data: dict, key: str, value: dict) -> None:
    """Set one step in the results file as it is on disk now (other runs and hand-written notes kept)."""
    data["steps"][key] = value
    current = _load(preset)
    current["steps"][key] = value
    if "model" in data:
        current.setdefault("model", data["model"])
    _save(preset, current)


def _save(preset: str, data: dict) -> None:
    path = _results_path(preset)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    _write_markdown(data, path.with_suffix(".md"))


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "note": "2 cores and 24 GB shared with other engineers' jobs; times are upper bounds"}


def _recipes(steps: dict) -> list[str]:
    return list(dict.fromkeys(key.split(" ", 1)[1] for key in steps))


def _summary_table(steps: dict) -> list[str]:
    """One row per recipe: its first build (GPTQ uncached), the calibration KL, verify and bench."""
    lines = ["| recipe | build s | peak RSS GiB | bundle GB | KL on calibration (top-1) | verify (mean KL, texts exact) "
             "| TTFT s engine / reference | TPOT s engine / reference | peak memory GB engine / reference |",
             "|---|---:|---:|---:|---|---|---|---|---|"]
    for recipe in _recipes(steps):
        build = steps.get(f"build {recipe}", {})
        verify = (steps.get(f"verify {recipe}") or {}).get("summary")
        bench = (steps.get(f"bench {recipe}") or {}).get("summary")
        if build.get("error") or not build:
            cells = [build.get("error", "not built"), "", "", ""]
        else:
            q = build.get("quantization_eval")
            cells = [f"{build['wall_seconds']:.0f}", f"{build['peak_rss_gib']:.2f}", f"{build['bundle_bytes'] / 1e9:.2f}",
                     f"{q['mean_kl']:.2g} ({q['top1_agreement']:.3f})" if q else "-"]
        if verify:
            checks = verify["verdict"]["checks"]
            cells.append(f"{'pass' if verify['verdict']['passed'] else 'fail'} ({checks['first_token_mean_kl']['value']:.2g}, "
                         f"{checks['text_exact_match']['value']:.2f})")
        else:
            cells.append("")
        if bench:
            proto, engine = bench["protocol"], next(k for k in bench["protocol"] if k != "reference")
            ref = proto.get("reference", {})
            for metric in ("average_ttft_sec", "average_tpot_sec", "average_memory_usage_gb"):
                value = f"{proto[engine][metric]:.3f}"
                cells.append(f"{value} / {ref[metric]:.3f}" if metric in ref else value)
        else:
            cells += ["", "", ""]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return lines


def _step_summary(key: str, summary: dict) -> list[str]:
    """Verify: its checks and stage cosines; bench: the challenge protocol per system (full JSON in the .json)."""
    if key.startswith("verify"):
        lines = ["| check | value | limit | result |", "|---|---|---|---|"]
        lines += [f"| {name} | {c['value']:.6g} | {c['op']} {c['limit']} | {'pass' if c['passed'] else 'FAIL'} |"
                  for name, c in summary["verdict"]["checks"].items()]
        lines += ["", "| stage | cosine | max abs | rel |", "|---|---|---|---|"]
        lines += [f"| {name} | {s['cosine']:.12f} | {s['max_abs']:.3g} | {s['rel']:.3g} |"
                  for name, s in summary["stages"].items()]
        return lines
    if key.startswith("bench"):
        lines = ["| system | TTFT s | TPOT s | inference s | memory GB |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {p['average_ttft_sec']:.3f} | {p['average_tpot_sec']:.4f} | {p['average_inference_time_sec']:.3f} "
                  f"| {p['average_memory_usage_gb']:.2f} |" for name, p in summary["protocol"].items()]
        settings = summary.get("settings", {})
        lines.append(f"\n{settings.get('iters')} iterations after {settings.get('warmup')} warm-up, "
                     f"{settings.get('audio_seconds')} s clip, isolated processes: {settings.get('isolated')}; "
                     "reference drift (last/first run) "
                     f"{summary.get('reference_drift')}.")
        return lines
    return ["```json", json.dumps(summary, indent=1)[:4000], "```"]


def _write_markdown(data: dict, path: Path) -> None:
    lines = [f"# {data['preset']}: real-size build, bench and verify on CPU", "",
             f"Machine: {data['machine']['cpus']} CPUs, {data['machine']['ram_gib']} GiB RAM ({data['machine']['note']}).",
             "Produced by `benchmarks/real_size/run.py`.", ""]
    if "model" in data:
        m = data["model"]
        lines += [f"Model folder: {m.get('bytes', 0) / 1e9:.2f} GB, written in {m.get('wall_seconds')} s, "
                  f"peak RSS {m.get('peak_rss_gib')} GiB.", ""]
    lines += [f"Note: {n}" for n in data.get("notes", [])] + ([""] if data.get("notes") else [])
    lines += _summary_table(data["steps"]) + [""]
    for key, step in data["steps"].items():
        lines.append(f"## {key}")
        if step.get("error"):
            lines += [f"FAILED: {step['error']}", ""]
            continue
        if key.startswith("build"):
            lines.append(f"Wall {step['wall_seconds']} s, peak RSS {step['peak_rss_gib']} GiB (anonymous "
                         f"{step.get('peak_anon_rss_gib', 'not recorded')}), bundle {step['bundle_bytes'] / 1e9:.2f} GB.")
            lines += ["", "| stage | seconds | peak RSS GiB | peak anonymous RSS GiB |", "|---|---:|---:|---:|"]
            lines += [f"| {n} | {s['seconds']} | {s['peak_rss_gib']} | {s.get('peak_anon_rss_gib', '')} |"
                      for n, s in step["stages"].items()]
            lines += ["", "| component | bytes |", "|---|---:|"]
            lines += [f"| {n} | {b:,} |" for n, b in step["sizes_bytes"].items()]
            if step.get("quantization_eval"):
                q = step["quantization_eval"]
                lines.append(f"\nQuantization on calibration: mean KL {q['mean_kl']:.4g}, top-1 {q['top1_agreement']:.3f} "
                             f"over {q['positions']} positions.")
        else:
            lines.append(f"Wall {step['wall_seconds']} s, peak RSS {step['peak_rss_gib']} GiB (anonymous "
                         f"{step.get('peak_anon_rss_gib', 'not recorded')}), exit {step['rc']}.")
            if step.get("summary"):
                lines += [""] + _step_summary(key, step["summary"])
        lines.append("")
    path.write_text("\n".join(lines))


def _recorded(data: dict, key: str) -> bool:
    """A step counts as done once recorded, unless it was killed (negative rc: OOM killer, Ctrl-C) or
    crashed (rc > 1); rc 1 is a verdict (verify's failed checks) and is kept."""
    step = data["steps"].get(key)
    if step is None:
        return False
    if key.startswith(("build", "rebuild")):
        return not step.get("error")
    return step.get("rc", 0) in (0, 1)


def _build(args, data: dict, calib: Path, config: Path, recipe: str, bundle: Path, key: str, why: str) -> None:
    """Build one bundle in a child process (`--one`: its own RSS sampler) and record it as `KEY RECIPE`."""
    fragment = args.root / f".{args.preset}-{recipe}.build.json"
    _wait_for_ram(args.min_free_gib)
    print(f"{key} {args.preset} {recipe}{why} (free {psutil.virtual_memory().available / 2**30:.1f} GiB)", flush=True)
    rc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--calib", str(calib), "--root", str(args.root),
                         "--one", str(config), recipe, str(bundle), "--fragment", str(fragment)]).returncode
    _record(args.preset, data, f"{key} {recipe}", json.loads(fragment.read_text()) if rc == 0 and fragment.is_file()
            else {"error": f"build exited {rc} (see the log)"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, choices=["challenge-1b", "challenge-3b"])
    ap.add_argument("--recipes", nargs="+", default=["w4a16"])
    ap.add_argument("--root", type=Path, default=Path("/work/realsize"))
    ap.add_argument("--calib", type=Path, default=None, 
                    help="annotation .json (default ROOT/calib-data/annotation.json, made by demo-data)")
    ap.add_argument("--steps", nargs="+", default=["build", "verify", "bench"])
    ap.add_argument("--bench-iters", type=int, default=3)
    ap.add_argument("--min-free-gib", type=float, default=0.0, help="wait for this much available RAM before each step")
    ap.add_argument("--no-bench-reference", dest="bench_reference", action="store_false",
                    help="bench the bundle alone (the fp32 PyTorch reference of a 3B needs ~16 GB beside it)")
    ap.add_argument("--verify-data", type=Path, default=None,
                    help="annotation .json for verify (default ROOT/calib-data/verify-4.json: 2 ASR + 2 AAC clips)")
    ap.add_argument("--isolate-bench", action="store_true",
                    help="bench --isolate: reference and engine each in its own process (a 3B and its engine do not "
                         "fit 24 GB together)")
    ap.add_argument("--delete-bundles", action="store_true",
                    help="delete each bundle once its steps are recorded (disk: a 3B fp32 bundle is ~17 GB); "
                         "the quantization cache keeps a rebuild cheap")
    ap.add_argument("--one", nargs=3, metavar=("CONFIG", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--fragment", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        _build_one(Path(args.one[0]), args.one[1], Path(args.one[2]), args.calib, args.fragment, args.root / "quant-cache")
        return
    root = args.root
    calib = args.calib or root / "calib-data" / "annotation.json"
    if not calib.is_file():
        subprocess.run([*CLI, "demo-data", str(calib.parent)], check=True)
    folder = root / args.preset
    data = _load(args.preset)
    sidecar = root / f"{args.preset}.model.json"  # how the model folder was written (kept if a step rewrote the file)
    if "model" in data:
        sidecar.write_text(json.dumps(data["model"]))
    elif sidecar.is_file():
        data["model"] = json.loads(sidecar.read_text())
    log_path = root / f"{args.preset}.steps.log"
    if not (folder / "config.yaml").is_file():
        rec = _timed([*CLI, "tiny", str(folder), "--preset", args.preset], log_path)
        data["model"] = {**rec, "bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())}
        _save(args.preset, data)
    config = folder / "config.yaml"
    for recipe in args.recipes:
        bundle = root / f"{args.preset}-{recipe}"
        if "build" in args.steps and not _recorded(data, f"build {recipe}"):
            _build(args, data, calib, config, recipe, bundle, "build", "")
        pending = [step for step in ("verify", "bench") if step in args.steps and not _recorded(data, f"{step} {recipe}")]
        if pending and _recorded(data, f"build {recipe}") and not (bundle / "manifest.json").is_file():
            # deleted after an earlier run (--delete-bundles, disk): rebuilt from the quantization cache and
            # recorded apart from the first build, whose GPTQ times the cache would hide
            _build(args, data, calib, config, recipe, bundle, "rebuild", f" for {' and '.join(pending)}")
        if not (bundle / "manifest.json").is_file():
            continue
        if "verify" in args.steps and not _recorded(data, f"verify {recipe}"):
            report = root / f"{args.preset}-{recipe}.verify.json"
            verify_data = args.verify_data or calib.parent / "verify-4.json"
            if not verify_data.is_file():
                entries = json.loads(calib.read_text())["annotation"]
                pick = [e for e in entries if e["task"] == "asr"][:2] + [e for e in entries if e["task"] != "asr"][:2]
                verify_data.write_text(json.dumps({"annotation": pick}, indent=1))
            _wait_for_ram(args.min_free_gib)
            rec = _timed([*CLI, "verify", str(bundle), "--model", str(config), "--data", str(verify_data),
                          "--report", str(report)], log_path)
            rec["summary"] = json.loads(report.read_text()) if report.is_file() else None
            _record(args.preset, data, f"verify {recipe}", rec)
        if "bench" in args.steps and not _recorded(data, f"bench {recipe}"):
            out = root / f"{args.preset}-{recipe}.bench.json"
            _wait_for_ram(args.min_free_gib)
            rec = _timed([*CLI, "bench", str(bundle), "--model", str(config), "--warmup", "1",
                          "--iters", str(args.bench_iters), "--stage-iters", "1", "--no-generation",
                          *([] if args.bench_reference else ["--no-reference"]),
                          *(["--isolate"] if args.isolate_bench else []), "--out", str(out)], log_path)
            rec["summary"] = json.loads(out.read_text()) if out.is_file() else None
            _record(args.preset, data, f"bench {recipe}", rec)
        if args.delete_bundles and all(_recorded(data, f"{step} {recipe}") for step in args.steps):
            shutil.rmtree(bundle)
            print(f"deleted {bundle} (its steps are recorded)", flush=True)


if __name__ == "__main__":
    main()
