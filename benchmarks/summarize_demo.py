"""Markdown table of benchmarks/run_demo.sh results: verify figures and held-out scores per recipe.

The verdict is recomputed with the recipe files' current thresholds (a bundle keeps the ones it
was built with), so the table shows what the shipped thresholds say about these measurements.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from salmonn_export.harness.parity import judge
from salmonn_export.recipes import load_recipe


def passes(result: dict, recipe: str) -> bool:
    """Judge with the recipe file's thresholds (as a manifest stores the recipe: through JSON)."""
    return judge(result, {"recipe": json.loads(json.dumps(load_recipe(recipe).to_dict()))})["passed"]


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def main(results: Path) -> None:
    order = ["fp32", "fp16", "w8a16", "w8a8", "w4a16", "w4a16-textcalib", "w4a16-rtn", "w4a16-lmhead", "w4a8",
             "w4a8-lmhead", "w4a8-int8enc"]  # audio GPTQ, text-only GPTQ and RTN side by side
    found = {p.name[len("verify_demo_"):-len(".json")] for p in results.glob("verify_demo_*.json")}
    recipes = ["reference"] + [r for r in order if r in found] + sorted(found - set(order) - {"all"})
    print("| recipe | held-out WER % | held-out CIDEr-D | verify | speech cos | 1st-token KL | top-1 | exact | "
          "WER vs ref | CIDEr-D vs ref |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in recipes:
        asr = load(results / f"heldout_demo_{r}_asr.json") or {}
        aac = load(results / f"heldout_demo_{r}_aac.json") or {}
        wer = asr.get("score", {}).get("wer_percent", float("nan"))
        cider = aac.get("score", {}).get("spider", float("nan")) / 100
        v = load(results / f"verify_demo_{r}.json")
        if v is None:
            print(f"| {r} | {wer:.2f} | {cider:.3f} | | | | | | | |")
            continue
        e2e, ft = v["end_to_end"], v["first_token"]
        print(f"| {r} | {wer:.2f} | {cider:.3f} | {'pass' if passes(v, r) else 'FAIL'} | "
              f"{v['stages']['speech_embeds']['cosine']:.6f} | {ft['mean_kl']:.2e} | {ft['top1_agreement']:.2f} | "
              f"{e2e['exact_match']:.2f} | {e2e['wer_engine_vs_reference']:.3f} | "
              f"{e2e.get('cider_engine_vs_reference', float('nan')):.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
