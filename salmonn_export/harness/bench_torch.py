"""The PyTorch engine (`build --target torch` bundles) as a `bench` System, beside the reference.

Same protocol as `bench_systems.reference_system`: the input batch (log-mel, raw wave, mask) is
built once outside the timers; TTFT = encoders + Q-Former + prompt wrap (tokenisation included)
+ prefill, synchronised; TPOT = one decode step (the CUDA-graph-captured step when the engine was
loaded with `compile_decode`), synchronised. Bytes per decode step are counted from the tensors
the step really reads, in their device dtype (int4 codes, scales, dense weights, norms, and the
embedding matrix when the lm_head is tied to it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from salmonn_export.harness.bench import System
from salmonn_export.runtime.generation import positions_from_mask
from salmonn_export.torch_engine.engine import TorchEngine


def decode_bytes(engine: TorchEngine) -> int:
    """Bytes one decode step reads from weights (not the KV cache, not the embedding lookup)."""
    llm = engine.llm
    total = 0
    for name, t in list(llm.named_buffers()) + list(llm.named_parameters()):
        if t is None or name in ("cos_table", "sin_table", "key_mask") or name.endswith(("k_cache", "v_cache")):
            continue
        total += t.numel() * t.element_size()
    if llm.lm_head is None:  # tied: the lm_head matmul reads the whole embedding matrix
        total += llm.embed_tokens.numel() * llm.embed_tokens.element_size()
    return total


def kv_bytes_per_token(engine: TorchEngine) -> int:
    a = engine.llm.layers[0].self_attn
    return 2 * len(engine.llm.layers) * a.kv_heads * a.head_dim * torch.finfo(engine.llm_dtype).bits // 8


def torch_engine_system(bundle: str | Path, wave: np.ndarray, device: str = "cuda", name: str | None = None,
                        compile_decode: bool = True, engine: TorchEngine | None = None) -> System:
    """A System over a torch bundle at batch 1, task asr (the challenge's efficiency protocol)."""
    eng = engine or TorchEngine(bundle, device=device, compile_decode=compile_decode)
    batch = eng.encoders.batch([wave])
    max_new = eng.manifest["generation"]["max_new_tokens"]

    @torch.inference_mode()
    def ttft(_wave):
        eng.sync()
        with eng.autocast():
            speech = eng.encoders.encode(*batch).to(eng.llm_dtype)
        embeds, mask = eng.prompt_wrap(speech, ["asr"])
        logits = eng.prefill(embeds, mask, positions_from_mask(mask), max_new)
        eng.sync()
        return logits, mask

    @torch.inference_mode()
    def tpot(state):
        logits, mask = state
        token = logits[:, -1].argmax(-1)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
        eng.sync()
        eng.decode_step(eng.llm.embed(token)[:, None, :], positions_from_mask(mask)[:, -1:], mask.shape[1] - 1)
        eng.sync()

    with torch.inference_mode(), eng.autocast():
        hidden = eng.encoders.encode_whisper(batch[0])
        beats = eng.encoders.encode_beats(batch[1], batch[2]) if eng.encoders.beats is not None else None
        speech = eng.encoders.qformer_project(hidden, beats).to(eng.llm_dtype)

    def timed(fn):
        def run():
            with torch.inference_mode(), eng.autocast():
                fn()
            eng.sync()
        return run

    embeds, mask = eng.prompt_wrap(speech, ["asr"])
    stages = {
        "whisper": timed(lambda: eng.encoders.encode_whisper(batch[0])),
        "beats": timed(lambda: eng.encoders.encode_beats(batch[1], batch[2]) if beats is not None else None),
        "qformer_projection": timed(lambda: eng.encoders.qformer_project(hidden, beats)),
        "prompt_wrap": timed(lambda: eng.prompt_wrap(speech, ["asr"])),
        "prefill": timed(lambda: eng.prefill(embeds, mask, positions_from_mask(mask), max_new)),
    }
    files = eng.manifest["files"]
    weight_bytes = sum((Path(eng.bundle) / f).stat().st_size for f in files if f.endswith(".safetensors"))

    def mb(module) -> float:
        return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers())
                   if t is not None) / 1e6

    sizes = {"encoders": mb(eng.encoders), "llm": mb(eng.llm)}
    label = name or f"torch:{eng.manifest['recipe']['name']}:{str(eng.llm_dtype).replace('torch.', '')}"

    def generate(waves, num_beams, max_new_tokens):
        speech = eng.encode_speech(waves)
        e, m = eng.prompt_wrap(speech, ["asr"] * len(waves))
        ids = eng.generate_ids(e, m, num_beams=num_beams, max_new_tokens=max_new_tokens)
        pad = eng.manifest["generation"]["pad_token_id"]
        return int(sum((int(np.nonzero(r == pad)[0][0]) + 1) if (r == pad).any() else len(r) for r in ids))

    return System(label, ttft, tpot, stages, weight_bytes, decode_bytes(eng), kv_bytes_per_token(eng), generate,
                  lambda clip: eng.transcribe([clip], "asr")[0], sizes)
