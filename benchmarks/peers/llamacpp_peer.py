"""llama.cpp (Q4_0, Q4_K_M, F16) beside our decoders, same merged LLM, one interleaved run.

Setup (own venv; llama-cpp-python compiles llama.cpp, a few minutes on 2 cores):

    python3 -m venv /tmp/venv-llama
    /tmp/venv-llama/bin/pip install llama-cpp-python gguf numpy torch==2.13.0 "transformers==4.57.6" \
        safetensors sentencepiece onnxruntime soundfile soxr platformdirs pyyaml
    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcp && tar xzf /tmp/lcp/*.tar.gz -C /tmp/lcp
    PYTHONPATH=. /tmp/venv-llama/bin/python benchmarks/peers/llamacpp_peer.py \
        --hf-llm MERGED_HF_DIR --llama-cpp-src /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp BUNDLE... --json OUT

If the first decode dies with SIGILL (`tilezero`: a VM that reports AMX but cannot run it), use
`build_ggml_cpu.sh` and run with `LLAMA_CPP_LIB_PATH` set to its output folder.

The HF → GGUF conversion uses llama.cpp's own `convert_hf_to_gguf.py` from that source tree. It
refuses BPE tokenizers it has not seen; ours is trained locally with GPT-2's byte-level
pre-tokenizer, so the converter is told "gpt-2". Quantization uses llama.cpp's
`llama_model_quantize`. Prefill is fed token ids of the same length as our audio-conditioned prompt.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import runpy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, ours, report  # noqa: E402


def convert(hf_dir: Path, src: Path, out: Path) -> Path:
    if out.is_file():
        return out
    config = hf_dir / "tokenizer_config.json"
    data = json.loads(config.read_text())
    if data.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; the converter runs on 4.x
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.write_text(json.dumps(data, indent=1))
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    import conversion.base as base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outfile", str(out), "--outtype", "f16"]
    try:
        runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return out


def quantize(f16: Path, out: Path, ftype: int) -> Path:
    import llama_cpp

    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params))
        if rc != 0:
            raise SystemExit(f"llama_model_quantize failed ({rc})")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--hf-llm", type=Path, required=True)
    ap.add_argument("--llama-cpp-src", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamacpp-peer"))
    ap.add_argument("--prompt-tokens", type=int, default=109)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import llama_cpp

    f16 = convert(args.hf_llm, args.llama_cpp_src, args.work / "llm-f16.gguf")
    models = {"llama.cpp F16": f16,
              "llama.cpp Q4_0": quantize(f16, args.work / "llm-q4_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
              "llama.cpp Q4_K_M": quantize(f16, args.work / "llm-q4_k_m.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)}
    n = args.prompt_tokens
    rng = np.random.default_rng(0)
    systems = []
    for name, path in models.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=args.threads, n_batch=512, verbose=False)
        tokens = [int(t) for t in rng.integers(10, llm.n_vocab() - 20, n)]

        def prefill(llm=llm, tokens=tokens):
            llm.reset()
            llm.eval(tokens)

        def decode(llm=llm, tokens=tokens):
            llm.reset()
            llm.eval(tokens)
            t0 = time.perf_counter()
            llm.eval([tokens[0]])
            return time.perf_counter() - t0

        systems.append((name, prefill, decode, path.stat().st_size))
    systems += [ours(b, n, rng) for b in args.bundles]
    result = {"prompt_tokens": n, "iters": args.iters, "threads": args.threads, "llama_cpp_python": llama_cpp.__version__,
              "systems": interleave(systems, args.warmup, args.iters)}
    report(result, args.json)


if __name__ == "__main__":
    main()
