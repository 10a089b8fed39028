"""Stages 5-6: write the compact shipped artifact, then score the model it materializes.

The artifact (`salmonn_export/model/demo_model/`) holds the LLM folder in fp16, the BEATs `.pt`,
and `trained.safetensors`: every trained tensor in fp16, the Q-Former matrices as their low-rank
factors. `salmonn_export.model.demo` turns it into an ordinary SALMONN folder on first use.
Scores come from that materialized folder through the PyTorch reference, so they are the
scores of exactly what users get.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from salmonn_export.files import atomic_dir


def write_artifact(work: Path, out: Path, challenge_config: dict | None = None) -> dict:
    """The artifact from work/checkpoint_best.pth + factors_best.pt; `challenge_config` (config
    fields the run chose, e.g. the Q-Former windowing: `salmonn_export.model.demo.demo_config`)
    goes into the metadata."""
    ckpt = torch.load(work / "checkpoint_best.pth", weights_only=True)
    import stage2

    factors = torch.load(work / "factors_best.pt", weights_only=True)
    trained = {}
    for k, v in ckpt["model"].items():
        if k.endswith("position_ids"):
            continue  # a fixed arange buffer, rebuilt on materialization
        name = k[: -len(".weight")] if k.endswith(".weight") else None
        if name and name.startswith("speech_Qformer.") and f"{name}.u" in factors:
            trained[f"{name}.u"] = factors[f"{name}.u"].half().contiguous()
            trained[f"{name}.v"] = factors[f"{name}.v"].half().contiguous()
        else:
            trained[k] = v.half().contiguous()
    with atomic_dir(out, force=True) as tmp:
        source = work / "llm_adapted" if (work / "llm_adapted").is_dir() else work / "llm"
        llm = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        llm.to(torch.float16).save_pretrained(str(tmp / "llm"))
        for f in source.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, tmp / "llm" / f.name)
        shutil.copy(work / "beats.pt", tmp / "beats.pt")
        metadata = {"format": "salmonn-export demo v1", "qformer_rank": str(stage2.RANK), "epoch": str(ckpt["epoch"])}
        if challenge_config:
            metadata["challenge_config"] = json.dumps(challenge_config, sort_keys=True)
        save_file(trained, str(tmp / "trained.safetensors"), metadata=metadata)
        shutil.copy(work / "train_log.json", tmp / "train_log.json")
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return {"artifact": str(out), "bytes": sum(sizes.values()), "files": sizes}


def score(work: Path, out: Path) -> dict:
    """Held-out WER (ASR) and CIDEr-D (AAC) of the materialized model, PyTorch reference, beam 4."""
    from salmonn_export.harness.metrics import compute_spider, compute_wer
    from salmonn_export.model.demo import materialize_demo
    from salmonn_export.model.salmonn import load_salmonn

    folder = materialize_demo(work / "materialized", artifact=out)
    model = load_salmonn(folder / "config.yaml")
    clips = [c for c in json.loads((work / "clips.json").read_text()) if c["split"] == "heldout"]
    # captions lowercased, so the challenge scorer (lowercased hyps vs raw refs) gives plain CIDEr-D
    annotation = [{"testset_id": f"heldout{i:04d}", "path": c["path"], "task": c["task"], "text": c["text"].lower()}
                  for i, c in enumerate(clips)]
    (work / "heldout.json").write_text(json.dumps({"annotation": annotation}, indent=1))  # for `eval` on engines
    result = {}
    for task in ("asr", "audiocaption_v2"):
        subset = [c for c in clips if c["task"] == task]
        t0 = time.time()
        hyps = model.transcribe([work / c["path"] for c in subset], task, batch_size=8)
        refs = [c["text"] for c in subset]
        if task == "asr":
            metric = {k: v for k, v in compute_wer(hyps, refs).items() if k != "items"}
        else:  # the challenge scorer compares lowercased hyps with raw refs; CIDEr-D lowercases both
            metric = {"spider_challenge": compute_spider(hyps, refs)["spider"],
                      "cider_d": compute_spider(hyps, [r.lower() for r in refs])["cider_d"]}
        result[task] = {"n": len(subset), **metric, "seconds": round(time.time() - t0, 1),
                        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:5]]}
    (out / "scores.json").write_text(json.dumps(result, indent=1))
    return result
