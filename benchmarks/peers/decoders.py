"""Decoder graphs alone, one per recipe, for timing beside the peers (`all_peers.py --decoder`).

Each is exactly the graph `build` writes for that recipe (same `build_decoder_graph`, same bits,
block and accuracy_level), from the merged LLM of a challenge config. GPTQ recipes are quantized
with round-to-nearest here: the codes' values differ, their layout and kernels — all that timing
sees — do not, and this skips calibration (minutes of encoder runs per recipe on 2 cores).

    .venv/bin/python benchmarks/peers/decoders.py --model /tmp/salmonn-small/model/config.yaml \
        --out /tmp/decoders fp32 w8a16 w4a16 w4a8 w4a16-lmhead
    # also writes the merged LLM as an HF folder (OUT/merged-hf) for llama.cpp / PyTorch peers
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from salmonn_export.export.decoder_graph import build_decoder_graph  # noqa: E402
from salmonn_export.model.salmonn import load_salmonn  # noqa: E402
from salmonn_export.recipes import load_recipe  # noqa: E402
from salmonn_export.transforms.lora import merged_llm  # noqa: E402
from salmonn_export.transforms.quantize import quantize_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    salmonn = load_salmonn(args.model)
    base = merged_llm(salmonn)
    hf = args.out / "merged-hf"
    if not hf.is_dir():
        base.save_pretrained(str(hf))
        salmonn.llama_tokenizer.save_pretrained(str(hf))
    cfg = base.config
    info = {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads, "hidden": cfg.hidden_size,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "vocab": base.lm_head.weight.shape[0]}
    for i, name in enumerate(args.recipes):
        recipe = load_recipe(name)
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        # one copy per recipe, except the last, which quantizes the base itself (a 1B LLM in fp32 is 5 GB)
        last = i == len(args.recipes) - 1
        llm, layers, level = (base if last else copy.deepcopy(base)), None, 0
        weights = recipe.llm.weights
        if weights is not None:
            weights = replace(weights, method="rtn")
            layers = quantize_model(llm, weights, recipe.llm.skip_modules, None, release_weights=True).layers
            level = weights.accuracy_level
        graph = build_decoder_graph(llm, folder / "decoder.onnx", layers, accuracy_level=level)
        (folder / "llm.json").write_text(json.dumps({**info, "recipe": name, "graph": graph.as_dict()}, indent=1))
        print(name, graph.as_dict(), flush=True)
        del llm, layers


if __name__ == "__main__":
    main()
