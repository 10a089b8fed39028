"""Do the challenge's stack (transformers 4.46.3) and we read our HF folders the same way?

Writes the folders this project writes (`tiny`; a tiny tied Llama with Llama-3.2's `llama3` rope
scaling, as the challenge presets have; the materialized demo model), loads each here
(transformers 5, our loaders) and in a side venv with transformers 4.46.3 (benchmarks/compat/
load_446.py, loading as the challenge code does), and compares: tokenizer ids of a few texts,
`len(tokenizer)` with `[PAD]`, config values (rope_theta, rope_scaling, vocab, eos ...), the
rotary inverse frequencies actually used, logits of one forward pass, and for Whisper the
features and encoder output of a 2-s tone. Two controls keep the check honest: the tiny LLM
folder with the config.json, or the tokenizer_config.json, that transformers 5 writes by itself
must FAIL (θ silently 10000 / "TokenizersBackend does not exist").

usage: .venv/bin/python benchmarks/compat/check_446.py [--venv /tmp/compat446] [--work /tmp/compat446-work]
Creates the venv when missing (pip install transformers==4.46.3 torch==2.13.0: the local CPU wheel).
Results: benchmarks/results/compat_446.json and .md. Exit 1 when a folder (not a control) differs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TEXTS = ["USER: <Speech>", "</Speech> Recognize the speech and give me the transcription.\nASSISTANT:",
         "the quick brown fox jumps over the lazy dog<|end_of_text|>", "héllo wörld, 1234 — ok?"]
SIDE_PACKAGES = ["transformers==4.46.3", "torch==2.13.0"]
LOGIT_TOL = 1e-4  # max |Δ| of fp32 logits between the two versions' forward passes
ENCODER_TOL = 1e-4


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    versions = "import transformers, torch; print(transformers.__version__, torch.__version__)"
    probe = subprocess.run([str(python), "-c", versions], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.startswith("4.46.3 "):
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SIDE_PACKAGES], check=True)
        probe = subprocess.run([str(python), "-c", versions], capture_output=True, text=True, check=True)
    print("side venv:", probe.stdout.strip())
    return python


def write_folders(work: Path) -> list[dict]:
    from transformers import AutoConfig, AutoTokenizer

    from salmonn_export.model import tiny
    from salmonn_export.model.demo import materialize_demo

    folders = []
    t = tiny.write_tiny_salmonn(work / "tiny", preset="tiny", seed=0, force=True)
    folders.append({"name": "tiny", "llm": str(t / "llm"), "whisper": str(t / "whisper")})
    tiny.PRESETS["tiny-llama32-tied"] = replace(
        tiny.PRESETS["tiny"], tied=True, llama={**tiny.PRESETS["tiny"].llama, "max_position_embeddings": 131072,
                                                "rope_scaling": dict(tiny.LLAMA32_ROPE_SCALING)})
    t2 = tiny.write_tiny_salmonn(work / "tiny-llama32-tied", preset="tiny-llama32-tied", seed=1, force=True)
    folders.append({"name": "tiny-llama32-tied", "llm": str(t2 / "llm"), "whisper": None})
    demo = materialize_demo(work / "demo", force=True)
    folders.append({"name": "demo", "llm": str(demo / "llm"), "whisper": str(demo / "whisper")})
    # controls: the tiny LLM folder with one file as transformers 5 writes it by itself
    for control, what in (("control-config-as-transformers5-writes", "config"),
                          ("control-tokenizer-as-transformers5-writes", "tokenizer")):
        folder = work / control
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(t / "llm", folder)
        if what == "config":
            AutoConfig.from_pretrained(str(folder)).save_pretrained(str(folder))
        else:
            AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
        folders.append({"name": control, "llm": str(folder), "whisper": None, "control": True})
    return folders


def ours(folder: dict, out: Path) -> dict:
    """What this project's loaders (transformers 5) see in the folder."""
    from transformers import AutoConfig

    from salmonn_export.model.llm import load_base_llm, load_tokenizer
    from salmonn_export.model.whisper import load_feature_extractor, load_whisper_encoder, whisper_features

    name = folder["name"]
    result: dict = {}
    tok = load_tokenizer(folder["llm"])
    ids = [tok(t, add_special_tokens=False).input_ids for t in TEXTS]
    config = AutoConfig.from_pretrained(folder["llm"])
    model = load_base_llm(folder["llm"])
    forward_ids = torch.tensor([[tok.bos_token_id] + ids[0]])
    with torch.no_grad():
        np.save(out / f"{name}.ours.logits.npy", model(input_ids=forward_ids).logits.double().numpy())
    np.save(out / f"{name}.ours.inv_freq.npy", model.model.rotary_emb.inv_freq.double().numpy())
    rope = dict(config.rope_parameters)
    result["llm"] = {
        "len_tokenizer": len(tok), "ids": ids, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "forward_ids": forward_ids[0].tolist(),
        "config": {"rope_theta": rope.get("rope_theta"),
                   "rope_scaling": None if rope.get("rope_type") == "default" else
                   {k: v for k, v in rope.items() if k != "rope_theta"},
                   "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_word_embeddings,
                   "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                   "num_key_value_heads": config.num_key_value_heads,
                   "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
                   "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id},
        "generation_eos_token_id": model.generation_config.eos_token_id,
        "attention_scaling": float(getattr(model.model.rotary_emb, "attention_scaling", 1.0)),
    }
    if folder.get("whisper"):
        fe = load_feature_extractor(folder["whisper"])
        wave = np.sin(np.arange(16000 * 2) * 2 * np.pi * 440 / 16000).astype(np.float32) * 0.3
        feats = whisper_features(fe, wave)[None]
        encoder = load_whisper_encoder(folder["whisper"])
        with torch.no_grad():
            np.save(out / f"{name}.ours.encoder.npy", encoder(feats).last_hidden_state.double().numpy())
        np.save(out / f"{name}.ours.features.npy", feats.double().numpy())
        c = encoder.config
        result["whisper"] = {"config": {"d_model": c.d_model, "num_mel_bins": c.num_mel_bins,
                                        "encoder_layers": c.encoder_layers, "max_source_positions": c.max_source_positions},
                             "feature_size": fe.feature_size}
    return result


def _max_diff(a: Path, b: Path) -> float | None:
    if not (a.is_file() and b.is_file()):
        return None
    x, y = np.load(a), np.load(b)
    return float(np.abs(x - y).max()) if x.shape == y.shape else float("inf")


def compare(folder: dict, mine: dict, theirs: dict, out: Path) -> dict:
    name = folder["name"]
    checks: dict[str, bool] = {}
    row: dict = {"name": name, "control": bool(folder.get("control")), "ours": mine, "transformers_4_46": theirs}
    llm = theirs.get("llm", {})
    if "error" in llm:
        row["error_446"] = llm["error"]
        checks["llm loads in 4.46"] = False
    else:
        checks["tokenizer ids"] = llm["ids"] == mine["llm"]["ids"]
        checks["len(tokenizer) with [PAD]"] = llm["len_tokenizer"] == mine["llm"]["len_tokenizer"]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            checks[f"tokenizer {key}"] = llm[key] == mine["llm"][key]
        for key, value in mine["llm"]["config"].items():
            checks[f"config {key}"] = llm["config"][key] == value
        checks["generation eos_token_id"] = llm["generation_eos_token_id"] == mine["llm"]["generation_eos_token_id"]
        inv = _max_diff(out / f"{name}.inv_freq.npy", out / f"{name}.ours.inv_freq.npy")
        logits = _max_diff(out / f"{name}.logits.npy", out / f"{name}.ours.logits.npy")
        row["inv_freq_max_abs_diff"], row["logits_max_abs_diff"] = inv, logits
        checks["rotary inv_freq (max |Δ| ≤ 1e-12)"] = inv is not None and inv <= 1e-12
        checks["attention_scaling"] = llm["attention_scaling"] == mine["llm"]["attention_scaling"]
        checks[f"logits (max |Δ| ≤ {LOGIT_TOL:g})"] = logits is not None and logits <= LOGIT_TOL
    if folder.get("whisper"):
        whisper = theirs.get("whisper", {})
        if "error" in whisper:
            row["whisper_error_446"] = whisper["error"]
            checks["whisper loads in 4.46"] = False
        else:
            checks["whisper config"] = whisper["config"] == mine["whisper"]["config"]
            feats = _max_diff(out / f"{name}.features.npy", out / f"{name}.ours.features.npy")
            enc = _max_diff(out / f"{name}.encoder.npy", out / f"{name}.ours.encoder.npy")
            row["whisper_features_max_abs_diff"], row["whisper_encoder_max_abs_diff"] = feats, enc
            checks["whisper features (identical)"] = feats == 0.0
            checks[f"whisper encoder (max |Δ| ≤ {ENCODER_TOL:g})"] = enc is not None and enc <= ENCODER_TOL
    row["checks"] = checks
    row["same"] = all(checks.values())
    row["passed"] = (not row["same"]) if row["control"] else row["same"]
    return row


def markdown(rows: list[dict], versions: str) -> str:
    lines = ["# Our HF folders read by the challenge's stack (transformers 4.46.3)", "",
             f"Side venv: {versions}. Produced by `benchmarks/compat/check_446.py`; controls are the tiny LLM folder "
             "with one file as transformers 5 writes it by itself, and must differ.", "",
             "| folder | control | same as ours | passed | rope_theta (ours / 4.46) | logits max abs diff "
             "| whisper encoder max abs diff | failed checks / error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours_theta = r["ours"]["llm"]["config"]["rope_theta"]
        theirs_theta = r["transformers_4_46"].get("llm", {}).get("config", {}).get("rope_theta", "-")
        failed = [k for k, v in r["checks"].items() if not v]
        detail = r.get("error_446") or ", ".join(failed) or "-"

        def fmt(v):
            return "-" if v is None else f"{v:.3g}"

        lines.append(f"| {r['name']} | {'yes' if r['control'] else 'no'} | {'yes' if r['same'] else 'no'} | "
                     f"{'yes' if r['passed'] else 'NO'} | {ours_theta} / {theirs_theta} | {fmt(r.get('logits_max_abs_diff'))} | "
                     f"{fmt(r.get('whisper_encoder_max_abs_diff'))} | {detail} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path("/tmp/compat446"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/compat446-work"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "compat_446")
    args = parser.parse_args()
    python = ensure_venv(args.venv)
    args.work.mkdir(parents=True, exist_ok=True)
    folders = write_folders(args.work)
    out = args.work / "probes"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    job = args.work / "job.json"
    job.write_text(json.dumps({"texts": TEXTS, "folders": folders}))
    subprocess.run([str(python), str(Path(__file__).with_name("load_446.py")), str(job), str(out)], check=True,
                   env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "TRANSFORMERS_VERBOSITY": "error"})
    rows = []
    for folder in folders:
        theirs = json.loads((out / f"{folder['name']}.json").read_text())
        rows.append(compare(folder, ours(folder, out), theirs, out))
    versions = f"transformers {rows[0]['transformers_4_46']['transformers']}, torch {rows[0]['transformers_4_46']['torch']}"
    import transformers

    summary = {"side_venv": versions, "ours": f"transformers {transformers.__version__}, torch {torch.__version__}",
               "texts": TEXTS, "passed": all(r["passed"] for r in rows), "folders": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str) + "\n")
    args.results.with_suffix(".md").write_text(markdown(rows, versions))
    print(markdown(rows, versions))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
