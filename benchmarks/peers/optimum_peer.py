"""Hugging Face Optimum's ONNX Runtime model vs our decoders, same merged LLM, one interleaved run.

Optimum's exporter (optimum-onnx) needs transformers 4.57, so this runs in its own venv with the
repo on PYTHONPATH (our runtime needs only onnxruntime + numpy + tokenizers):

    python3 -m venv /tmp/venv-optimum
    /tmp/venv-optimum/bin/pip install torch==2.13.0 "transformers==4.57.6" optimum-onnx onnxruntime \
        soundfile soxr platformdirs pyyaml
    # the merged LLM as an HF folder (main venv):  merged_llm(load_salmonn(cfg)).save_pretrained(DIR)
    /tmp/venv-optimum/bin/optimum-cli export onnx --model DIR --task text-generation-with-past OPT_DIR
    PYTHONPATH=. /tmp/venv-optimum/bin/python benchmarks/peers/optimum_peer.py OPT_DIR BUNDLE... --json OUT

Optimum's Llama export takes `input_ids` (no `inputs_embeds`), so its prefill is fed token ids of the
same length as our audio-conditioned prompt; compute is the same for a given length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, ours, report  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("optimum_dir")
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--prompt-tokens", type=int, default=109, help="prefill length (BOS + prompt + 88 speech)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(args.optimum_dir, use_cache=True, use_io_binding=False)
    n = args.prompt_tokens
    ids = torch.randint(0, model.config.vocab_size - 1, (1, n))
    mask = torch.ones(1, n, dtype=torch.long)

    def opt_prefill():
        return model(input_ids=ids, attention_mask=mask, use_cache=True)

    out = opt_prefill()
    nxt = out.logits[:, -1:].argmax(-1)
    mask2 = torch.ones(1, n + 1, dtype=torch.long)

    def opt_decode():
        t0 = time.perf_counter()
        model(input_ids=nxt, attention_mask=mask2, past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - t0

    size = sum(f.stat().st_size for f in Path(args.optimum_dir).glob("model.onnx*"))
    systems = [("optimum-ort", opt_prefill, opt_decode, size)]
    rng = np.random.default_rng(0)
    systems += [ours(b, n, rng) for b in args.bundles]
    result = {"prompt_tokens": n, "iters": args.iters, "systems": interleave(systems, args.warmup, args.iters)}
    report(result, args.json)


if __name__ == "__main__":
    main()
