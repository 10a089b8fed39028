"""Shared by the peer scripts: our decoders as peer systems, and the interleaved timing loop.

A system is (name, prefill(), decode() -> seconds, weight bytes): prefill runs the whole prompt,
decode times one KV-cache step after a prefill (the prefill itself is not timed there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PeerSystem = tuple[str, Callable[[], object], Callable[[], float], int]


def ours(bundle: str | Path, prompt_tokens: int, rng: np.random.Generator) -> PeerSystem:
    """Our ONNX decoder of a bundle, fed random embeddings of the prompt's length."""
    from salmonn_export.runtime.engine import Engine
    from salmonn_export.runtime.generation import positions_from_mask

    eng = Engine(bundle)
    n = prompt_tokens
    embeds = (rng.standard_normal((1, n, eng.manifest["llm"]["hidden"])) * 0.02).astype(np.float32)
    mask = np.ones((1, n), dtype=np.int64)
    logits, past = eng.decoder_step(embeds, mask, positions_from_mask(mask), None)
    token = logits[:, -1].argmax(-1)
    mask2 = np.ones((1, n + 1), dtype=np.int64)

    def prefill():
        eng.decoder_step(embeds, mask, positions_from_mask(mask), None)

    def decode():
        t0 = time.perf_counter()
        eng.decoder_step(eng.embed(token)[:, None, :], mask2, positions_from_mask(mask2)[:, -1:], past)
        return time.perf_counter() - t0

    size = (Path(bundle) / eng.manifest["components"]["decoder"]["data_file"]).stat().st_size
    return f"ours {eng.manifest['recipe']['name']}", prefill, decode, size


def interleave(systems: list[PeerSystem], warmup: int, iters: int) -> dict[str, dict[str, float]]:
    """Median prefill and decode times (ms), systems alternating inside every iteration."""
    times = {name: {"prefill": [], "decode": []} for name, *_ in systems}
    for it in range(warmup + iters):
        for name, prefill, decode, _ in systems:
            t0 = time.perf_counter()
            prefill()
            p = time.perf_counter() - t0
            d = decode()
            if it >= warmup:
                times[name]["prefill"].append(p)
                times[name]["decode"].append(d)
    sizes = {name: size for name, _, _, size in systems}
    return {name: {"prefill_median_ms": 1000 * float(np.median(t["prefill"])),
                   "decode_median_ms": 1000 * float(np.median(t["decode"])),
                   "weights_mb": sizes[name] / 1e6} for name, t in times.items()}


def report(result: dict, json_path: Path | None) -> None:
    """Print one line per system; write the whole result as JSON when a path is given."""
    import json

    for name, r in result["systems"].items():
        print(f"{name:18s} prefill {r['prefill_median_ms']:8.2f} ms   decode {r['decode_median_ms']:7.2f} ms   "
              f"weights {r['weights_mb']:7.1f} MB")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
