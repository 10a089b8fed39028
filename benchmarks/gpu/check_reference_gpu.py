"""One prepared GPU check of the PyTorch reference (run on a lent GPU machine, results to $OUT).

1. Our torch Kaldi fbank vs torchaudio.compliance.kaldi.fbank (torchaudio exists there, not here).
2. The reference on CUDA under fp16 autocast (as the challenge runs it) vs CPU fp32 on a tiny
   model and generated clips: speech-embedding error and text agreement.
3. Whisper/BEATs/Q-Former/prefill/decode-step timings of the `small` preset on the GPU,
   challenge protocol shape (10 s noise, batch 1), 3 warm-up + 20 timed.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from salmonn_export.model.beats import kaldi_fbank  # noqa: E402
from salmonn_export.model.salmonn import load_salmonn  # noqa: E402
from salmonn_export.model.synth import sound_scene  # noqa: E402
from salmonn_export.model.tiny import write_tiny_salmonn  # noqa: E402

out_dir = Path(os.environ.get("OUT", "/tmp/gpu-out"))
out_dir.mkdir(parents=True, exist_ok=True)
result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

import torchaudio  # noqa: E402

rng = np.random.default_rng(0)
diffs = []
for n in (16000, 37123, 160000, 480000):
    wave = torch.from_numpy(rng.standard_normal(n) * 0.1) * 2**15
    ours = kaldi_fbank(wave)
    theirs = torchaudio.compliance.kaldi.fbank(wave.unsqueeze(0), num_mel_bins=128, sample_frequency=16000,
                                                frame_length=25, frame_shift=10)
    diffs.append({"samples": n, "frames": list(ours.shape), "max_abs": float((ours - theirs).abs().max()),
                  "bit_exact": bool(torch.equal(ours, theirs))})
result["fbank_vs_torchaudio"] = diffs
print(json.dumps(diffs))

tiny = write_tiny_salmonn("/tmp/tiny-gpu", "tiny", 0, force=True)
waves = [sound_scene(k, 2.0, seed=i) for i, k in enumerate(("tone", "chirp", "noise", "beeps"))]
cpu = load_salmonn(tiny / "config.yaml", device="cpu")
gpu = load_salmonn(tiny / "config.yaml", device="cuda")
rows = []
for w in waves:
    b = cpu.make_batch([w], ["asr"])
    t_cpu, s_cpu = cpu.generate_batch(b)
    t_gpu, s_gpu = gpu.generate_batch(b)
    s_gpu = s_gpu.float().cpu()
    cos = torch.nn.functional.cosine_similarity(s_cpu.flatten(), s_gpu.flatten(), dim=0)
    rows.append({"same_text": t_cpu == t_gpu, "speech_cos": float(cos),
                 "speech_max_abs": float((s_cpu - s_gpu).abs().max()), "cpu": t_cpu[0], "gpu": t_gpu[0]})
result["tiny_cpu_fp32_vs_cuda_fp16_autocast"] = rows
print(json.dumps(rows)[:2000])

small = write_tiny_salmonn("/tmp/small-gpu", "small", 0, force=True)
model = load_salmonn(small / "config.yaml", device="cuda")
wave = np.random.default_rng(1).standard_normal(160000)
batch = model.make_batch([wave], ["asr"])


def timed(fn, warm=3, iters=20):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return {"mean_ms": 1000 * float(np.mean(ts)), "median_ms": 1000 * float(np.median(ts)), "min_ms": 1000 * min(ts)}


lm = model.causal_lm.half()
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
    spec = batch.spectrogram.cuda()
    raw = batch.raw_wav.cuda()
    mask = batch.padding_mask.cuda()
    timings = {
        "whisper": timed(lambda: model.encode_whisper(spec)),
        "beats": timed(lambda: model.encode_beats(raw, mask)),
    }
    wh = model.encode_whisper(spec)
    be = model.encode_beats(raw, mask)
    timings["qformer_proj"] = timed(lambda: model.qformer_project(model.fuse(wh, be)))
    speech = model.qformer_project(model.fuse(wh, be))
    embeds, atts = model.prompt_wrap(speech.half(), model.prompts_for(["asr"]))
    timings["prefill"] = timed(lambda: lm(inputs_embeds=embeds, attention_mask=atts))
    outp = lm(inputs_embeds=embeds, attention_mask=atts, use_cache=True)
    nxt = outp.logits[:, -1].argmax(-1, keepdim=True)
    import copy

    def step():
        cache = copy.deepcopy(outp.past_key_values)
        return lm(input_ids=nxt, past_key_values=cache, use_cache=True)

    timings["decode_step_incl_cache_copy"] = timed(step)
    timings["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1024**3
result["small_preset_cuda_fp16_timings"] = timings
print(json.dumps(timings))
(out_dir / "gpu_reference_check.json").write_text(json.dumps(result, indent=1))
