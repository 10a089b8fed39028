"""Bounded load test of `salmonn-export serve` on loopback: throughput and latency percentiles for
1..N concurrent clients. Starts its own server (127.0.0.1, a free port) unless --url is given.

    python benchmarks/load_test.py --engine engines/demo-w4a16 --clients 1,2,4 --requests 8 \
        --json benchmarks/results/load_test.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--engine", engine, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-wait-ms", "20"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).json().get("status") == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("server did not start: " + proc.stderr.read().decode()[-500:])


def run_level(url: str, audio: bytes, clients: int, requests: int, timeout: float) -> dict:
    def one(_):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/audio/transcriptions", files={"file": ("a.wav", audio, "audio/wav")}, timeout=timeout)
        return r.status_code, time.perf_counter() - t0

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = np.array([t for code, t in results if code == 200])
    return {"clients": clients, "requests": requests, "ok": int(len(lat)), "wall_s": wall,
            "throughput_rps": len(lat) / wall,
            "latency_s": ({p: float(np.percentile(lat, q)) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
                          if len(lat) else {}),
            "status_codes": sorted({c for c, _ in results})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", help="bundle to serve (required unless --url)")
    ap.add_argument("--url", help="an already running server")
    ap.add_argument("--audio", help="WAV to send (default: 3 s of generated tone)")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level (bounded)")
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.requests > 200:
        raise SystemExit("--requests is capped at 200 per level")
    if args.audio:
        audio = Path(args.audio).read_bytes()
    else:
        import io

        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, 0.3 * np.sin(2 * np.pi * 440 * np.arange(48000) / 16000), 16000, format="WAV")
        audio = buf.getvalue()
    proc = None
    url = args.url
    if url is None:
        if not args.engine:
            raise SystemExit("give --engine or --url")
        proc, url = start_server(args.engine, args.max_batch)
    try:
        levels = [run_level(url, audio, int(c), args.requests, args.timeout) for c in args.clients.split(",")]
        metrics = httpx.get(url + "/metrics").text
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    batches = [line for line in metrics.splitlines() if line.startswith("salmonn_batch_size_")]
    result = {"url": url if args.url else "local", "engine": args.engine, "levels": levels, "batch_metrics": batches}
    for lv in levels:
        lat = lv["latency_s"]
        print(f"{lv['clients']:>3} clients: {lv['throughput_rps']:.2f} req/s, p50 {lat.get('p50', float('nan')):.3f} s, "
              f"p90 {lat.get('p90', float('nan')):.3f} s, codes {lv['status_codes']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
