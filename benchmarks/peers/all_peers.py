"""Every LLM runtime beside every recipe of ours, one interleaved run: decode (batch 1), beam 4, roofline.

Systems, all on the same merged LLM: llama.cpp F16 / Q8_0 / Q4_0 / Q4_K_M (llama-cpp-python),
PyTorch eager fp32 (and torch.compile with --compile), ONNX Runtime GenAI's int4 builder graph
run in plain ONNX Runtime (--genai DIR, built with `python -m onnxruntime_genai.models.builder`),
and our decoders from the given bundles. Per system, iterations interleaved across systems:
prefill of a prompt of the bundle's length, one decode step after it (batch 1), and where the
system has beam search, generation cost per token at 4 beams (forced lengths 4 and 24, EOS
blocked, differenced so the prefill cancels). Roofline: weight bytes read per step / step time
against this machine's all-thread read bandwidth, measured in the same run. The load average is
recorded before and after (other jobs share this machine's cores).

Runs in the llama.cpp venv (see llamacpp_peer.py for its setup; our runtime needs only
onnxruntime + numpy + tokenizers there):

    PYTHONPATH=. /tmp/venv-llama/bin/python benchmarks/peers/all_peers.py --hf-llm MERGED_HF_DIR \
        --llama-cpp-src /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp BUNDLE... --out benchmarks/results/peers_small

On a VM whose CPU reports AMX it cannot execute (SIGILL in the first decode), rebuild the CPU
backend without AMX first and point llama-cpp-python at it: `build_ggml_cpu.sh`, then
`LLAMA_CPP_LIB_PATH=DIR` in front of the command above.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, ours  # noqa: E402

LLAMA_CPP_TYPES = ("F16", "Q8_0", "Q4_K_M", "Q4_0")  # quantized from F16 by llama.cpp (LLAMA_FTYPE_MOSTLY_<type>)


def llama_cpp_systems(hf_llm: Path, src: Path, work: Path, n: int, threads: int, rng,
                      types: tuple[str, ...] = LLAMA_CPP_TYPES) -> list:
    import llama_cpp
    from llamacpp_peer import convert, quantize

    f16 = convert(hf_llm, src, work / "llm-f16.gguf")
    systems = []
    for kind in types:
        name = f"llama.cpp {kind}"
        path = f16 if kind == "F16" else quantize(f16, work / f"llm-{kind.lower()}.gguf",
                                                  getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}"))
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
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

        systems.append((name, prefill, decode, path.stat().st_size, None))
    return systems


def torch_systems(hf_llm: Path, n: int, compile_too: bool, beam: bool) -> list:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(hf_llm), torch_dtype=torch.float32).eval()
    torch.manual_seed(0)
    embeds = torch.randn(1, n, lm.config.hidden_size) * 0.02
    mask = torch.ones(1, n, dtype=torch.long)
    out = []
    variants = [("torch eager fp32", lm)]
    if compile_too:
        compiled = copy.deepcopy(lm)
        compiled.forward = torch.compile(compiled.forward, dynamic=True)
        variants.append(("torch.compile fp32", compiled))
    for name, model in variants:
        @torch.inference_mode()
        def prefill(model=model):
            return model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)

        first = prefill()
        token = first.logits[:, -1].argmax(-1, keepdim=True)

        @torch.inference_mode()
        def decode(model=model, first=first, token=token):
            cache = copy.deepcopy(first.past_key_values)
            t0 = time.perf_counter()
            model(input_ids=token, past_key_values=cache, use_cache=True)
            return time.perf_counter() - t0

        @torch.inference_mode()
        def beam4(model=model):
            def run(k):
                t0 = time.perf_counter()
                model.generate(inputs_embeds=embeds, attention_mask=mask, num_beams=4, max_new_tokens=k,
                               min_new_tokens=k, do_sample=False)
                return time.perf_counter() - t0
            return (run(24) - run(4)) / 20

        size = sum(p.numel() * p.element_size() for p in model.parameters())
        out.append((name, prefill, decode, size, beam4 if beam else None))
    return out


def genai_system(folder: Path, n: int, threads: int, rng) -> tuple:
    """ONNX Runtime GenAI's builder graph (input_ids, attention_mask, past_key_values.i.key/value)
    run in plain ONNX Runtime with a growing cache (its own GenAI loop is not used)."""
    import onnxruntime as ort

    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    dec = cfg["decoder"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(folder / dec["filename"]), opts)
    layers, kv, hd = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
    ids = rng.integers(10, cfg["vocab_size"] - 20, (1, n)).astype(np.int64)
    names = [i.name for i in sess.get_inputs()]

    def feeds(input_ids, total, past):
        f = {"input_ids": input_ids, "attention_mask": np.ones((1, total), np.int64)}
        if "position_ids" in names:
            f["position_ids"] = np.arange(total - input_ids.shape[1], total, dtype=np.int64)[None]
        for i in range(layers):
            f[f"past_key_values.{i}.key"] = past[2 * i]
            f[f"past_key_values.{i}.value"] = past[2 * i + 1]
        return f

    empty = [np.zeros((1, kv, 0, hd), np.float32) for _ in range(2 * layers)]
    outs = sess.run(None, feeds(ids, n, empty))
    past = outs[1:]

    def prefill():
        sess.run(None, feeds(ids, n, empty))

    def decode():
        t0 = time.perf_counter()
        sess.run(None, feeds(ids[:, :1], n + 1, past))
        return time.perf_counter() - t0

    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data"))
    return "ORT GenAI builder int4", prefill, decode, size, None


def our_beam4(bundle: str, n: int, rng):
    from salmonn_export.runtime.engine import Engine

    eng = Engine(bundle)
    embeds = (rng.standard_normal((1, n, eng.manifest["llm"]["hidden"])) * 0.02).astype(np.float32)
    mask = np.ones((1, n), dtype=np.int64)

    def beam4():
        def run(k):
            t0 = time.perf_counter()
            eng.generate_ids(embeds, mask, num_beams=4, max_new_tokens=k, min_length=10**9)
            return time.perf_counter() - t0
        return (run(24) - run(4)) / 20

    return beam4


_TABLES: dict[tuple[int, int], np.ndarray] = {}


def _random_table(vocab: int, hidden: int, rng) -> np.ndarray:
    """One random embedding table per shape, shared by every decoder system (1 GB at 128k x 2048)."""
    if (vocab, hidden) not in _TABLES:
        _TABLES[vocab, hidden] = (rng.standard_normal((vocab, hidden)) * 0.02).astype(np.float32)
    return _TABLES[vocab, hidden]


def our_decoder(folder: Path, name: str, n: int, threads: int, rng) -> tuple:
    """A decoder graph alone (`decoder.onnx` + `llm.json`: layers, kv_heads, head_dim, vocab, hidden),
    run through the runtime's own KV cache and generation code exactly as `Engine` runs it."""
    import onnxruntime as ort

    from salmonn_export.runtime.generation import GenerationSettings, generate, positions_from_mask
    from salmonn_export.runtime.kv_cache import KVCache
    from salmonn_export.runtime.kv_cache import prefill as prefill_cache

    info = json.loads((folder / "llm.json").read_text())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "decoder.onnx"), opts)
    outs = [o.name for o in sess.get_outputs()]
    table = _random_table(info["vocab"], info["hidden"], rng)
    embeds = (rng.standard_normal((1, n, info["hidden"])) * 0.02).astype(np.float32)
    mask = np.ones((1, n), dtype=np.int64)

    def step(e, m, p, past):
        if past is None:
            cache = KVCache(sess, outs, e.shape[0], m.shape[1] + 32, info["layers"], info["kv_heads"], info["head_dim"],
                            info["vocab"])
            return prefill_cache(cache, e, m, p), cache
        return past.run(e, m, p), past

    first, cache = step(embeds, mask, positions_from_mask(mask), None)
    token = first[:, -1].argmax(-1)
    mask2 = np.ones((1, n + 1), dtype=np.int64)

    def prefill():
        step(embeds, mask, positions_from_mask(mask), None)

    def decode():
        t0 = time.perf_counter()
        cache.run(table[token][:, None, :], mask2, positions_from_mask(mask2)[:, -1:])
        return time.perf_counter() - t0

    def beam4():
        def run(k):
            settings = GenerationSettings(max_new_tokens=k, num_beams=4, eos_token_ids=[0], pad_token_id=0,
                                          min_length=10**9)
            t0 = time.perf_counter()
            generate(embeds, mask, settings, step, lambda past, idx: past.reorder(idx), lambda ids: table[ids][:, None, :])
            return time.perf_counter() - t0
        return (run(24) - run(4)) / 20

    return f"ours {name}", prefill, decode, (folder / "decoder.onnx.data").stat().st_size, beam4


def markdown(result: dict) -> str:
    lines = [f"# LLM peers, one interleaved run ({result['prompt_tokens']}-token prompt, {result['threads']} threads)", "",
             f"load average before / after: {result['load_before']} / {result['load_after']}; read bandwidth "
             f"{result['read_bandwidth_gbs']:.1f} GB/s (all threads)", "",
             "| system | weights (MB) | prefill (ms) | decode step (ms) | % of roofline | beam 4 (ms/token) | beam 4 / 4 steps |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sorted(result["systems"].items(), key=lambda kv: kv[1]["decode_median_ms"]):
        beam = r.get("beam4_ms_per_token")
        beam_cells = "| | |" if beam is None else f"| {beam:.2f} | {beam / (4 * r['decode_median_ms']):.2f} |"
        lines.append(f"| {name} | {r['weights_mb']:.1f} | {r['prefill_median_ms']:.1f} | {r['decode_median_ms']:.2f} | "
                     f"{100 * r['fraction_of_roofline']:.0f} % {beam_cells}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(result["systems"].items(), key=lambda kv: kv[1]["decode_median_ms"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(items) + 1.2))
    names = [k for k, _ in items]
    ax.barh(names, [r["decode_median_ms"] for _, r in items],
            color=["tab:blue" if k.startswith("ours") else "tab:gray" for k in names])
    for i, (_, r) in enumerate(items):
        ax.text(r["decode_median_ms"], i, f" {r['decode_median_ms']:.1f} ms ({r['weights_mb']:.0f} MB)", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("decode step, batch 1 (ms, lower is better)")
    ax.set_title(f"same LLM, {result['threads']} CPU threads, one interleaved run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="*")
    ap.add_argument("--decoder", action="append", default=[], metavar="NAME=DIR",
                    help="a decoder graph alone (decoder.onnx + llm.json), e.g. w4a8=/tmp/dec-w4a8")
    ap.add_argument("--hf-llm", type=Path, required=True)
    ap.add_argument("--llama-cpp-src", type=Path)
    ap.add_argument("--llama-cpp-types", default=",".join(LLAMA_CPP_TYPES),
                    help="comma-separated llama.cpp formats to time (F16 needs 2 bytes/param of RAM)")
    ap.add_argument("--genai", type=Path, help="folder written by onnxruntime_genai.models.builder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llamacpp-peer"))
    ap.add_argument("--prompt-tokens", type=int, default=109)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--no-torch", dest="torch", action="store_false",
                    help="leave PyTorch eager out (its fp32 copy of the LLM needs 4 bytes/param of RAM)")
    ap.add_argument("--torch-beam", action="store_true", help="also time transformers' 4-beam generate (slow)")
    ap.add_argument("--out", type=Path, required=True, help="prefix: writes PREFIX.json, PREFIX.md, PREFIX.png")
    args = ap.parse_args()
    os.environ.setdefault("SALMONN_EXPORT_THREADS", str(args.threads))
    from salmonn_export.harness.bench import memory_bandwidth_gbs

    args.work.mkdir(parents=True, exist_ok=True)
    n, rng = args.prompt_tokens, np.random.default_rng(0)
    load_before = os.getloadavg()
    bandwidth_before = memory_bandwidth_gbs(threads=args.threads)
    systems = []
    if args.llama_cpp_src:
        systems += llama_cpp_systems(args.hf_llm, args.llama_cpp_src, args.work, n, args.threads, rng,
                                     tuple(args.llama_cpp_types.split(",")))
    if args.genai:
        systems.append(genai_system(args.genai, n, args.threads, rng))
    if args.torch:
        systems += torch_systems(args.hf_llm, n, args.compile, args.torch_beam)
    for spec in args.decoder:
        name, folder = spec.split("=", 1)
        systems.append(our_decoder(Path(folder), name, n, args.threads, rng))
    for b in args.bundles:
        name, prefill, decode, size = ours(b, n, rng)
        systems.append((name, prefill, decode, size, our_beam4(b, n, rng)))
    # the larger of two probes, before and after the runs: one probe once read 18 GB/s in a run
    # whose PyTorch fp32 step alone moved 21 (this VM's bandwidth varies with its neighbours)
    bandwidth_after = memory_bandwidth_gbs(threads=args.threads)
    bandwidth = max(bandwidth_before, bandwidth_after)
    timed = interleave([s[:4] for s in systems], args.warmup, args.iters)
    beams = {s[0]: [] for s in systems if s[4] is not None}
    for _ in range(3):
        for s in systems:
            if s[4] is not None:
                beams[s[0]].append(s[4]())
    for name, r in timed.items():
        r["fraction_of_roofline"] = r["weights_mb"] * 1e6 / (r["decode_median_ms"] / 1e3) / (bandwidth * 1e9)
        if name in beams:
            r["beam4_ms_per_token"] = 1000 * float(np.median(beams[name]))
    result = {"prompt_tokens": n, "iters": args.iters, "threads": args.threads, "read_bandwidth_gbs": bandwidth,
              "read_bandwidth_before_after_load_gbs": [round(bandwidth_before, 1), round(bandwidth_after, 1)],
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
              "roofline_note": "fraction = weight bytes / decode step / read bandwidth (KV cache bytes not counted)",
              "systems": timed}
    try:
        import llama_cpp

        result["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))


if __name__ == "__main__":
    main()
