"""`salmonn-export verify`: the PyTorch reference and an engine on the same audio, stage by stage.

Per stage: cosine, max-abs and relative error of Whisper, BEATs and the speech embeddings; KL
divergence and top-1 agreement of the first generated token's distribution. End to end: exact
match of texts, token agreement, and word error rate of engine texts against reference texts
(and both against ground truth when the data has it). Pass/fail against the recipe thresholds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from salmonn_export.audio import load_audio
from salmonn_export.dataset import audio_files, read_annotation
from salmonn_export.errors import SalmonnError
from salmonn_export.harness.metrics import compute_spider, word_errors
from salmonn_export.model.salmonn import SALMONN
from salmonn_export.recipes import recipe_from_dict
from salmonn_export.runtime.engine import Engine
from salmonn_export.runtime.generation import positions_from_mask
from salmonn_export.tasks import short_task


@dataclass
class Item:
    audio: Path
    task: str
    text: str | None = None


def verify_items(data: str | Path | None, default: Callable[[], list[Item]],
                 audio_root: str | Path | None = None) -> list[Item]:
    """Audio folder (every file, both tasks), or a challenge annotation JSON (paths under
    `audio_root`, the config's `datasets.prefix`, when given), or the default set."""
    if data is None:
        return default()
    data = Path(data)
    if data.is_dir():
        return [Item(f, t) for f in audio_files(data) for t in ("asr", "aac")]
    if data.is_file() and data.suffix.lower() == ".json":
        return [Item(e.audio, short_task(e.task), e.text) for e in read_annotation(data, audio_root=audio_root)]
    raise SalmonnError("--data must be an audio folder or an annotation .json", data)


def _stats(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    ref = ref.astype(np.float64).ravel()
    out = out.astype(np.float64).ravel()
    diff = np.abs(ref - out)
    scale = np.abs(ref).max() or 1.0
    return {"cosine": float(ref @ out / (np.linalg.norm(ref) * np.linalg.norm(out) or 1.0)),
            "max_abs": float(diff.max()), "rel": float(diff.max() / scale)}


def _merge_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    if not rows:
        return {}
    return {"cosine": min(r["cosine"] for r in rows), "max_abs": max(r["max_abs"] for r in rows),
            "rel": max(r["rel"] for r in rows)}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def token_agreement(a: list[int], b: list[int]) -> float:
    n = max(len(a), len(b))
    return 1.0 if n == 0 else sum(x == y for x, y in zip(a, b)) / n


class Spill:
    """Per-item stage outputs of one side, kept on disk (`folder`) rather than in RAM: a Whisper-large
    hidden state is 7.7 MB per clip, and the two sides run one after the other so that the PyTorch
    reference can be freed before the engine loads (a 3B reference and an fp32 3B engine do not fit
    24 GB together)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []

    def add(self, arrays: dict[str, np.ndarray | None], ids: list[int], text: str) -> None:
        i = len(self.rows)
        names = {}
        for name, array in arrays.items():
            if array is not None:
                names[name] = self.folder / f"{i}.{name}.npy"
                np.save(names[name], np.asarray(array))
        self.rows.append({"arrays": names, "ids": ids, "text": text})

    def array(self, i: int, name: str) -> np.ndarray | None:
        path = self.rows[i]["arrays"].get(name)
        return None if path is None else np.load(path)


@torch.no_grad()
def reference_pass(reference: SALMONN, items: list[Item], spill: Spill, progress: Callable[[int, int], None] | None = None,
                   num_beams: int | None = None) -> Spill:
    """The PyTorch reference on every item (batch 1): stage outputs, first-token logits, texts."""
    for i, item in enumerate(items):
        batch = reference.make_batch([load_audio(item.audio)], [item.task])
        whisper = reference.encode_whisper(batch.spectrogram)
        beats = reference.encode_beats(batch.raw_wav, batch.padding_mask) if reference.beats is not None else None
        speech = reference.qformer_project(reference.fuse(whisper, beats))
        embeds, atts = reference.prompt_wrap(speech, reference.prompts_for([item.task]))
        logits = reference.causal_lm(inputs_embeds=embeds, attention_mask=atts).logits[0, -1].float().numpy()
        ids = reference.generate_ids(embeds, atts, num_beams=num_beams)[0].tolist()
        spill.add({"whisper": whisper.numpy(), "beats": None if beats is None else beats.numpy(),
                   "speech_embeds": speech.numpy(), "logits": logits}, ids, reference.decode(torch.tensor([ids]))[0])
        if progress:
            progress(i + 1, len(items))
    return spill


def engine_pass(engine: Engine, items: list[Item], spill: Spill, progress: Callable[[int, int], None] | None = None,
                num_beams: int | None = None) -> Spill:
    """The engine on every item (batch 1), the same outputs as `reference_pass`."""
    for i, item in enumerate(items):
        wave = load_audio(item.audio)
        whisper = engine.encode_whisper(engine.whisper_features([wave]))
        beats = engine.encode_beats([wave]) if engine.beats_cfg else None
        speech = engine.qformer(whisper, beats)
        embeds, mask = engine.prompt_wrap(speech, [item.task])
        logits, _ = engine.decoder_step(embeds, mask, positions_from_mask(mask), None)
        ids = engine.generate_ids(embeds, mask, num_beams=num_beams)[0].tolist()
        spill.add({"whisper": whisper, "beats": beats, "speech_embeds": speech, "logits": logits[0, -1]}, ids,
                  engine.decode(np.array([ids]))[0])
        if progress:
            progress(i + 1, len(items))
    return spill


@torch.no_grad()
def verify(reference: SALMONN, engine: Engine, items: list[Item], progress: Callable[[int, int], None] | None = None,
           num_beams: int | None = None, spill_dir: Path | None = None) -> dict:
    """Both sides already loaded: `reference_pass`, `engine_pass`, `compare` (spilled to a temporary
    folder unless `spill_dir` is given). `salmonn-export verify` runs the passes itself, freeing the
    reference before it loads the engine."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=spill_dir) as tmp:
        ref = reference_pass(reference, items, Spill(Path(tmp) / "reference"), progress, num_beams)
        eng = engine_pass(engine, items, Spill(Path(tmp) / "engine"), progress, num_beams)
        return compare(items, ref, eng)


def compare(items: list[Item], ref: Spill, eng: Spill) -> dict:
    """Stage statistics, first-token KL and top-1, and end-to-end text metrics of two passes."""
    stages: dict[str, list] = {"whisper": [], "beats": [], "speech_embeds": []}
    kls, top1, exact, agree = [], [], [], []
    ref_texts, eng_texts, truths = [], [], []
    rows = []
    for i, item in enumerate(items):
        for name in stages:
            r, e = ref.array(i, name), eng.array(i, name)
            if r is not None and e is not None:
                stages[name].append(_stats(r, e))
        r_logits, e_logits = ref.array(i, "logits"), eng.array(i, "logits")
        lp, lq = _log_softmax(r_logits), _log_softmax(e_logits)
        kls.append(float((np.exp(lp) * (lp - lq)).sum()))
        top1.append(float(r_logits.argmax() == e_logits.argmax()))
        r_ids, e_ids = ref.rows[i]["ids"], eng.rows[i]["ids"]
        r_text, e_text = ref.rows[i]["text"], eng.rows[i]["text"]
        exact.append(float(r_text == e_text))
        agree.append(token_agreement(r_ids, e_ids))
        ref_texts.append(r_text)
        eng_texts.append(e_text)
        truths.append(item.text)
        rows.append({"audio": str(item.audio), "task": item.task, "reference": r_text, "engine": e_text,
                     "exact": r_text == e_text, "first_token_kl": kls[-1]})
    result = {
        "items": len(items),
        "stages": {k: _merge_stats(v) for k, v in stages.items() if v},
        "first_token": {"mean_kl": float(np.mean(kls)), "max_kl": float(np.max(kls)), "top1_agreement": float(np.mean(top1))},
        "end_to_end": {"exact_match": float(np.mean(exact)), "token_agreement": float(np.mean(agree)),
                       "wer_engine_vs_reference": _wer(ref_texts, eng_texts)},
        "rows": rows,
    }
    e2e = result["end_to_end"]
    aac = [i for i, it in enumerate(items) if it.task != "asr"]
    aac = aac if len(aac) >= 2 else []  # CIDEr-D's document frequencies need a corpus of 2+ clips
    if aac:
        e2e["cider_engine_vs_reference"] = _cider([ref_texts[i] for i in aac], [eng_texts[i] for i in aac])
    if all(t is not None for t in truths):
        asr = [i for i, it in enumerate(items) if it.task == "asr"]
        if asr:
            e2e["wer_reference_vs_truth"] = _wer([truths[i] for i in asr], [ref_texts[i] for i in asr])
            e2e["wer_engine_vs_truth"] = _wer([truths[i] for i in asr], [eng_texts[i] for i in asr])
        if aac:
            e2e["cider_reference_vs_truth"] = _cider([truths[i] for i in aac], [ref_texts[i] for i in aac])
            e2e["cider_engine_vs_truth"] = _cider([truths[i] for i in aac], [eng_texts[i] for i in aac])
    return result


def _cider(refs: list[str], hyps: list[str]) -> float:
    """CIDEr-D with one reference per clip, both sides lowercased (the challenge lowercases hyps only)."""
    return compute_spider(hyps, [r.lower() for r in refs])["cider_d"]


def _wer(refs: list[str], hyps: list[str]) -> float:
    errors, words = 0, 0
    for r, h in zip(refs, hyps):
        e, n = word_errors(r, h)
        errors += e
        words += n
    return errors / words if words else 0.0


def judge(result: dict, manifest: dict) -> dict:
    """Compare against the recipe's thresholds (stored in the bundle's manifest)."""
    t = recipe_from_dict(manifest["recipe"]).thresholds
    checks = {
        "speech_embeds_cosine": (result["stages"]["speech_embeds"]["cosine"], ">=", t.min_speech_cosine),
        "first_token_mean_kl": (result["first_token"]["mean_kl"], "<=", t.max_first_token_kl),
        "first_token_top1": (result["first_token"]["top1_agreement"], ">=", t.min_top1_agreement),
        "text_exact_match": (result["end_to_end"]["exact_match"], ">=", t.min_text_exact_match),
        "wer_engine_vs_reference": (result["end_to_end"]["wer_engine_vs_reference"], "<=", t.max_wer_delta),
    }
    out = {}
    for name, (value, op, limit) in checks.items():
        ok = value >= limit if op == ">=" else value <= limit
        out[name] = {"value": value, "limit": limit, "op": op, "passed": bool(ok)}
    return {"checks": out, "passed": all(c["passed"] for c in out.values())}


def markdown_report(result: dict, verdict: dict, bundle: str, recipe: str) -> str:
    status = "PASS" if verdict["passed"] else "FAIL"
    lines = [f"# verify: {bundle} (recipe {recipe})", "", f"**{status}** on {result['items']} items", "",
             "| stage | cosine (min) | max abs | rel |", "|---|---|---|---|"]
    for name, s in result["stages"].items():
        lines.append(f"| {name} | {s['cosine']:.8f} | {s['max_abs']:.3e} | {s['rel']:.3e} |")
    ft, e2e = result["first_token"], result["end_to_end"]
    lines += ["", f"first token: mean KL {ft['mean_kl']:.4g}, max KL {ft['max_kl']:.4g}, "
                  f"top-1 agreement {ft['top1_agreement']:.3f}",
              "", "| end to end | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in e2e.items()]
    lines += ["", "| check | value | limit | result |", "|---|---|---|---|"]
    for name, c in verdict["checks"].items():
        lines.append(f"| {name} | {c['value']:.6g} | {c['op']} {c['limit']:g} | {'pass' if c['passed'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"
