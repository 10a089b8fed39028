"""Loading a long file: the challenge's whole-file path vs our prefix read (salmonn_export.audio.load_clip).

Writes a 40-minute 44.1 kHz stereo 16-bit WAV (and, with --flac, the same as FLAC), then loads it in
fresh subprocesses, one path per process, and records wall seconds and peak RSS (ru_maxrss) of each,
plus an empty-process baseline (Python + numpy + soundfile + soxr imported). Checks that both paths
give bit-identical 16 kHz input. Results: benchmarks/results/audio_long_file.{json,md}.

    nice -n 10 .venv/bin/python benchmarks/audio_long_file.py [--minutes 40] [--repeats 3] [--flac]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CHILD = r"""
import hashlib, resource, sys, time
import numpy as np, soundfile as sf, soxr  # noqa: F401  (the baseline imports the same)
from salmonn_export.audio import load_audio, prepare_wave
path, mode = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "whole_file":      # the challenge's evaluator: decode everything, then channel 0, resample, cut
    wave, sr = sf.read(path, dtype="float64")
    out = prepare_wave(wave, sr)
elif mode == "prefix_read":   # ours
    out = load_audio(path)
else:
    out = np.zeros(1)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(seconds, peak, hashlib.sha256(out.tobytes()).hexdigest(), out.shape[0])
"""


def _run(path: Path, mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    seconds, peak, digest, n = proc.stdout.split()
    return {"seconds": float(seconds), "peak_rss_bytes": int(peak), "sha256": digest, "samples": int(n)}


def _write(path: Path, minutes: float, rate: int = 44100) -> None:
    """Stereo speech-band noise + tone, written in 60 s blocks (never held whole in memory)."""
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", rate, 2, subtype="PCM_16") as f:
        for block in range(int(minutes)):
            t = (np.arange(60 * rate) + block * 60 * rate) / rate
            left = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
            f.write(np.stack([left, 0.5 * left[::-1]], axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flac", action="store_true", help="also a FLAC copy of the file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="salmonn-audio-bench-") as tmp:
        files = {"wav": Path(tmp) / "long.wav"}
        _write(files["wav"], args.minutes)
        if args.flac:
            files["flac"] = Path(tmp) / "long.flac"
            with sf.SoundFile(files["wav"]) as src, sf.SoundFile(files["flac"], "w", src.samplerate, 2,
                                                                   subtype="PCM_16") as dst:
                while True:
                    block = src.read(44100 * 60, dtype="int16")
                    if not len(block):
                        break
                    dst.write(block)
        runs = {}
        for fmt, path in files.items():
            for mode in ("baseline", "whole_file", "prefix_read"):
                trials = [_run(path, mode) for _ in range(args.repeats if mode != "whole_file" else max(1, args.repeats - 1))]
                runs[f"{fmt}/{mode}"] = {
                    "seconds_median": float(np.median([t["seconds"] for t in trials])),
                    "seconds_all": [round(t["seconds"], 4) for t in trials],
                    "peak_rss_mb_max": max(t["peak_rss_bytes"] for t in trials) / 2**20,
                    "sha256": trials[0]["sha256"], "samples": trials[0]["samples"],
                    "file_mb": path.stat().st_size / 2**20,
                }
            assert runs[f"{fmt}/whole_file"]["sha256"] == runs[f"{fmt}/prefix_read"]["sha256"], "inputs differ"
    result = {"file": f"{args.minutes:g} min, 44.1 kHz, stereo, 16-bit", "repeats": args.repeats,
              "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "bit_identical": True, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "audio_long_file.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Loading a long file ({result['file']})", "",
             "Fresh process per load; peak RSS includes Python + numpy + soundfile + soxr (see baseline).",
             "Both paths give bit-identical 16 kHz input (sha256 of the samples).", "",
             "| file | path | seconds (median) | peak RSS (MB) |", "|---|---|---:|---:|"]
    for key, r in runs.items():
        fmt, mode = key.split("/")
        lines.append(f"| {fmt} ({r['file_mb']:.0f} MB) | {mode} | {r['seconds_median']:.3f} | {r['peak_rss_mb_max']:.0f} |")
    (RESULTS / "audio_long_file.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
