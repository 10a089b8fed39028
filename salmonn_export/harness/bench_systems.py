"""The systems `bench` measures: the PyTorch reference and engine bundles, under one interface.

As in the challenge's efficiency script, the input batch (spectrogram, raw wave, mask) is built
once outside the timers; the BEATs fbank is inside (it is part of `extract_features`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from salmonn_export.harness.bench import System, peak_rss_gb
from salmonn_export.runtime.generation import positions_from_mask


def _file_bytes(bundle: Path, manifest: dict) -> tuple[int, int]:
    total = sum((bundle / f).stat().st_size for f in manifest["files"] if f.endswith((".data", ".npy")))
    decoder = (bundle / manifest["components"]["decoder"]["data_file"]).stat().st_size
    return total, decoder


def engine_system(bundle: str | Path, wave: np.ndarray, name: str | None = None, device: str = "cpu") -> System:
    from salmonn_export.runtime.engine import Engine

    eng = Engine(bundle, device=device)
    features = eng.whisper_features([wave])
    llm = eng.manifest["llm"]

    def ttft(_wave):
        beats = eng.encode_beats([wave]) if eng.beats_cfg else None
        speech = eng.qformer(eng.encode_whisper(features), beats)
        embeds, mask = eng.prompt_wrap(speech, ["asr"])
        logits, past = eng.decoder_step(embeds, mask, positions_from_mask(mask), None)
        return logits, past, mask

    def tpot(state):
        logits, past, mask = state
        token = logits[:, -1].argmax(-1)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
        eng.decoder_step(eng.embed(token)[:, None, :], mask, positions_from_mask(mask)[:, -1:], past)

    hidden = eng.encode_whisper(features)
    beats = eng.encode_beats([wave]) if eng.beats_cfg else None
    speech = eng.qformer(hidden, beats)
    embeds, mask = eng.prompt_wrap(speech, ["asr"])
    stages = {
        "whisper": lambda: eng.encode_whisper(features),
        "beats": (lambda: eng.encode_beats([wave])) if eng.beats_cfg else (lambda: None),
        "qformer_projection": lambda: eng.qformer(hidden, beats),
        "prompt_wrap": lambda: eng.prompt_wrap(speech, ["asr"]),
        "prefill": lambda: eng.decoder_step(embeds, mask, positions_from_mask(mask), None),
    }
    total, decoder = _file_bytes(Path(bundle), eng.manifest)
    kv = 2 * llm["layers"] * llm["kv_heads"] * llm["head_dim"] * 4

    def per_token(num_beams: int, short: int = 4, long: int = 24) -> float:
        """Seconds per generated token: forced-length generations of `long` and `short` tokens
        (EOS blocked by min_length) from the same prompt, differenced so the prefill cancels."""
        def run(n):
            t0 = time.perf_counter()
            eng.generate_ids(embeds, mask, num_beams=num_beams, max_new_tokens=n,
                             min_length=embeds.shape[1] + n)  # counts the prompt, as transformers' does
            return time.perf_counter() - t0

        return (run(long) - run(short)) / (long - short)

    def generate(waves, num_beams, max_new_tokens):
        speech = eng.encode_speech(waves)
        embeds, mask = eng.prompt_wrap(speech, ["asr"] * len(waves))
        ids = eng.generate_ids(embeds, mask, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return _count_tokens(ids, eng.manifest["generation"]["pad_token_id"])

    sizes = {k: v / 1e6 for k, v in eng.manifest.get("sizes", {}).items()}
    return System(name or f"engine:{eng.manifest['recipe']['name']}", ttft, tpot, stages, total, decoder, kv,
                  generate, lambda clip: eng.transcribe([clip], "asr")[0], sizes, per_token)


def _count_tokens(ids, pad: int) -> int:
    """Generated tokens, not counting the pad filling after a sequence ended (first pad/eos kept)."""
    ids = np.asarray(ids)
    total = 0
    for row in ids:
        hits = np.nonzero(row == pad)[0]
        total += int(hits[0]) + 1 if len(hits) else len(row)
    return total


def reference_system(config: str | Path, wave: np.ndarray, device: str = "cpu") -> System:
    import torch

    from salmonn_export.model.salmonn import Batch, load_salmonn

    model = load_salmonn(config, device=device)
    batch = model.make_batch([wave], ["asr"])
    # moved once, as the challenge's script moves its single batch before timing
    batch = Batch(batch.spectrogram.to(device), batch.raw_wav.to(device), batch.padding_mask.to(device), batch.tasks)
    lm = model.causal_lm
    prompts = model.prompts_for(["asr"])
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else contextlib.nullcontext

    @torch.inference_mode()
    def ttft(_wave):
        sync()
        with autocast():
            speech = model.encode_speech(batch)
            embeds, atts = model.prompt_wrap(speech, prompts)
            out = lm(inputs_embeds=embeds, attention_mask=atts, use_cache=True)
        sync()
        return out

    @torch.inference_mode()
    def tpot(out):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        with autocast():
            lm(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        sync()

    with torch.inference_mode():
        hidden = model.encode_whisper(batch.spectrogram)
        beats = model.encode_beats(batch.raw_wav, batch.padding_mask) if model.beats is not None else None
        speech = model.qformer_project(model.fuse(hidden, beats))
        embeds, atts = model.prompt_wrap(speech, prompts)

    inference = torch.inference_mode()
    stages = {
        "whisper": inference(lambda: model.encode_whisper(batch.spectrogram)),
        "beats": inference(lambda: model.encode_beats(batch.raw_wav, batch.padding_mask)),
        "qformer_projection": inference(lambda: model.qformer_project(model.fuse(hidden, beats))),
        "prompt_wrap": lambda: model.prompt_wrap(speech, prompts),
        "prefill": inference(lambda: lm(inputs_embeds=embeds, attention_mask=atts, use_cache=True)),
    }
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = lm.get_input_embeddings().weight
    decoder = sum(p.numel() * p.element_size() for p in lm.parameters()) - embed.numel() * embed.element_size()
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4

    def generate(waves, num_beams, max_new_tokens):
        b = model.make_batch(waves, ["asr"] * len(waves))
        s = model.encode_speech(b)
        e, a = model.prompt_wrap(s, model.prompts_for(["asr"] * len(waves)))
        ids = model.generate_ids(e, a, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return _count_tokens(ids.numpy(), model.generation_kwargs()["pad_token_id"])

    def mb(module) -> float:
        return sum(p.numel() * p.element_size() for p in module.parameters()) / 1e6

    sizes = {"whisper_encoder": mb(model.speech_encoder), "qformer": mb(model.speech_Qformer) + mb(model.speech_llama_proj),
             "llm": mb(lm)}
    if model.beats is not None:
        sizes["beats"] = mb(model.beats)
    return System("reference", ttft, tpot, stages, param_bytes, decoder, kv, generate,
                  lambda clip: model.transcribe([clip], "asr")[0], sizes)


def memory_probe(kind: str, target: str, seconds: float, device: str = "cpu") -> dict:
    """Run in a fresh interpreter: load one system, do 3 protocol iterations, report peak memory.

    CPU: peak RSS. CUDA: the reference's lifetime `torch.cuda.max_memory_allocated` (the challenge's
    figure); for an engine, the GPU memory this process holds according to NVML (ONNX Runtime has no
    allocator statistics), when nvidia-ml-py is installed."""
    wave = np.random.default_rng(0).standard_normal(int(16000 * seconds))
    before = peak_rss_gb()
    system = reference_system(target, wave, device) if kind == "reference" else engine_system(target, wave, device=device)
    after_load = peak_rss_gb()
    for _ in range(3):
        system.tpot(system.ttft(wave))
    result = {"peak_rss_gb": peak_rss_gb(), "rss_before_load_gb": before, "rss_after_load_gb": after_load}
    if device == "cpu":
        result["average_memory_usage_gb"] = result["peak_rss_gb"]
    elif kind == "reference":
        import torch

        result["average_memory_usage_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    else:
        result["average_memory_usage_gb"] = _nvml_process_gb()
    return result


def _nvml_process_gb() -> float | None:
    try:
        import os

        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return proc.usedGpuMemory / 1024**3
    except Exception:  # NVML missing or not permitted: the figure is simply not available
        return None
    return None


def isolated_probe(kind: str, target: str, seconds: float, device: str, warmup: int, iters: int, stage_iters: int,
                   seed: int) -> dict:
    """Run in a fresh interpreter (`bench --isolate`): one system alone — the challenge protocol, its
    stage medians and its peak memory — for models whose reference and engine do not fit in memory
    together (a 3B on 24 GB). Returns what `bench` assembles for an interleaved run, per system."""
    from salmonn_export.harness.bench import run_protocol, run_stages

    wave = np.random.default_rng(seed).standard_normal(int(16000 * seconds))
    system = reference_system(target, wave, device) if kind == "reference" else engine_system(target, wave, device=device)
    protocol = run_protocol([system], wave, warmup, iters)[system.name]
    stages = run_stages([system], min(warmup, 2), stage_iters)[system.name]
    peak = peak_rss_gb()
    memory = {"peak_rss_gb": peak, "average_memory_usage_gb": peak if device == "cpu" else None}
    if device != "cpu":
        if kind == "reference":
            import torch

            memory["average_memory_usage_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        else:
            memory["average_memory_usage_gb"] = _nvml_process_gb()
    return {"name": system.name, "protocol": protocol, "stages": stages, "memory": memory,
            "weight_bytes": system.weight_bytes, "decoder_bytes": system.decoder_bytes,
            "kv_bytes_per_token": system.kv_bytes_per_token, "sizes_mb": system.sizes_mb}
