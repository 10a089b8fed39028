"""The same merged LLM through the runtimes a user would otherwise pick, measured in one run.

Prefill (an audio-conditioned prompt of the bundle's shape: BOS + prompt + 88 speech embeddings)
and one decode step with the KV cache, interleaved per iteration across: PyTorch eager (fp32),
torch.compile (fp32), and our ONNX decoders from the given bundles (fp32 / w4a16 / ...).
Peers not run here: Hugging Face Optimum's ORT model (optimum-onnx needs transformers 4.57, this
project uses 5.x) and llama.cpp (llama-cpp-python compiles llama.cpp from source; not attempted).

    python benchmarks/peers/llm_peers.py --model /tmp/salmonn-small/model/config.yaml \
        /tmp/salmonn-small/small-fp32 /tmp/salmonn-small/small-w4a16 --json benchmarks/results/peers_small.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, ours, report  # noqa: E402

from salmonn_export.model.salmonn import load_salmonn  # noqa: E402
from salmonn_export.transforms.lora import merged_llm  # noqa: E402


def torch_system(name, lm, embeds, mask):
    @torch.inference_mode()
    def prefill():
        return lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)

    out = prefill()
    token = out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.inference_mode()
    def decode():
        cache = copy.deepcopy(out.past_key_values)
        t0 = time.perf_counter()
        lm(input_ids=token, past_key_values=cache, use_cache=True)
        return time.perf_counter() - t0

    size = sum(p.numel() * p.element_size() for p in lm.parameters())
    return name, prefill, decode, size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--model", required=True, help="challenge YAML of the model the bundles were built from")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    salmonn = load_salmonn(args.model)
    lm = merged_llm(salmonn)
    torch.manual_seed(0)
    speech = torch.randn(1, 88, lm.config.hidden_size) * 0.05
    embeds, mask = salmonn.prompt_wrap(speech, salmonn.prompts_for(["asr"]))
    embeds = embeds.float()
    systems = [torch_system("torch-eager", lm, embeds, mask)]
    if not args.no_compile:
        compiled = copy.deepcopy(lm)
        compiled.forward = torch.compile(compiled.forward, dynamic=True)
        systems.append(torch_system("torch-compile", compiled, embeds, mask))
    systems += [ours(b, embeds.shape[1], np.random.default_rng(0)) for b in args.bundles]
    result = {"prompt_tokens": int(embeds.shape[1]), "iters": args.iters, "threads": torch.get_num_threads(),
              "systems": interleave(systems, args.warmup, args.iters)}
    base = result["systems"]["torch-eager"]
    for r in result["systems"].values():
        r["prefill_speedup_vs_eager"] = base["prefill_median_ms"] / r["prefill_median_ms"]
        r["decode_speedup_vs_eager"] = base["decode_median_ms"] / r["decode_median_ms"]
    report(result, args.json)


if __name__ == "__main__":
    main()
