"""Diagnostics for the demo model's ASR: is the speech in the features, and how fast can an adapter learn it?

    python benchmarks/demo_model/probe.py --work /tmp/demo-train whisper-decoder
    python benchmarks/demo_model/probe.py --work /tmp/demo-train ctc --adapter qformer --steps 1500

`whisper-decoder` feeds the *stored* Whisper encoder features (the ones every SALMONN stage trains
on) to Whisper tiny.en's own decoder, on held-out and on training-voice sentences: what a decoder
trained on 680k hours reads out of them, the ceiling for any adapter on these features.

`ctc` trains an adapter with a CTC head straight onto the text (no LLM, no language prior) and
reports greedy held-out WER: an upper bound on what the adapter hands the LLM after as many steps.
`--adapter qformer` is the demo's window-level Q-Former (low-rank, as stage2 trains it);
`--adapter pool` a mean-pooled window through a 2-layer MLP, the cheapest learner. Units are the
demo LLM's BPE tokens or characters. Results are appended to benchmarks/results/demo_probes.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stage2  # noqa: E402

from salmonn_export.harness.metrics import compute_wer  # noqa: E402
from salmonn_export.model.qformer import BERT_HIDDEN, SpeechQFormer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "demo_probes.json"
CHARS = " abcdefghijklmnopqrstuvwxyz'"


class Units:
    """Text ↔ CTC label ids: the demo LLM's BPE tokens, or characters."""

    def __init__(self, kind: str, llm: Path):
        self.kind = kind
        if kind == "bpe":
            from salmonn_export.model.llm import load_tokenizer

            self.tokenizer = load_tokenizer(llm)
            self.size = len(self.tokenizer)
        else:
            self.size = len(CHARS)

    def encode(self, text: str) -> list[int]:
        if self.kind == "bpe":
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return [CHARS.index(c) for c in text if c in CHARS]

    def decode(self, ids: list[int]) -> str:
        if self.kind == "bpe":
            return self.tokenizer.decode(ids).strip()
        return " ".join("".join(CHARS[i] for i in ids).split())


def quiet_query_init(qformer: SpeechQFormer, gain: float = 0.05) -> None:
    """Start the Q-Former with the window's content, not its query, in the residual stream.

    Every BERT sublayer is post-LayerNorm, so the (input-independent) query token re-enters at unit
    scale after the first self-attention and dominates what cross-attention adds: measured on the
    demo's features at BERT init, the mean output vector has norm 26.9 against a 6.4 per-window
    deviation. Shrinking the gain of the first self-attention's LayerNorm makes the cross-attention
    sum mostly window content. Measured: no faster than the BERT init (demo_probes.json)."""
    with torch.no_grad():
        qformer.bert.encoder.layer[0].attention.output.LayerNorm.weight.fill_(gain)


class CTCProbe(nn.Module):
    def __init__(self, adapter: str, window: int, whisper_width: int, beats_width: int, labels: int, init: str,
                 rank: int = stage2.RANK):
        super().__init__()
        self.adapter, self.window = adapter, window
        self.ln_speech = nn.LayerNorm(whisper_width)
        if adapter == "qformer":
            self.ln_audio = nn.LayerNorm(beats_width)
            self.qformer = SpeechQFormer(whisper_width + beats_width)
            low = stage2.low_rank_qformer(self.qformer, rank=rank)
            if init == "xavier":  # product U·V with Xavier std instead of BERT's 0.02
                with torch.no_grad():
                    for layer in low.values():
                        rank, width_in = layer.v.shape
                        width_out = layer.u.shape[0]
                        layer.v.normal_(0, width_in ** -0.5)
                        layer.u.normal_(0, (2.0 * width_in / (rank * (width_in + width_out))) ** 0.5)
            if init == "quiet-query":
                quiet_query_init(self.qformer)
            self.query = nn.Parameter(torch.randn(1, 1, BERT_HIDDEN) * 0.02)
        else:
            self.pool = nn.Sequential(nn.Linear(whisper_width, 768), nn.GELU(), nn.Linear(768, BERT_HIDDEN))
        self.proj = nn.Linear(BERT_HIDDEN, 256)  # the demo LLM's width, as speech_llama_proj
        self.head = nn.Linear(256, labels + 1)  # last label: CTC blank

    def features(self, whisper_out: torch.Tensor, beats_out: list[torch.Tensor]) -> torch.Tensor:
        """[B, windows, 768]: what the adapter hands its projection (the Q-Former's output for qformer)."""
        if self.adapter == "pool":
            return self.pool(self.ln_speech(whisper_out).unfold(1, self.window, self.window).mean(-1))
        out = stage2.window_queries(self.ln_speech, self.ln_audio, self.qformer, self.query, whisper_out,
                                    beats_out, self.window)
        return out.view(whisper_out.shape[0], -1, out.shape[-1])

    def forward(self, whisper_out: torch.Tensor, beats_out: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.proj(self.features(whisper_out, beats_out)))


def ctc(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    feats = stage2.Features(args.work)
    units = Units(args.units, args.work / "llm")
    model = CTCProbe(args.adapter, args.window, feats.whisper_width, feats.beats_width, units.size, args.init,
                     args.rank)
    train = [i for i, c in enumerate(feats.clips) if c["task"] == "asr" and c["split"] == "train"]
    sentences = [i for i in train if "segments" not in feats.clips[i]]
    if args.clips == "single":
        train = sentences
    heldout = [i for i, c in enumerate(feats.clips) if c["task"] == "asr" and c["split"].startswith("heldout")]
    if args.clips == "all":  # train_natural's data: both held-out sets (unseen sentences, unseen voices), interleaved
        heldout = [i for pair in zip(*[[i for i in heldout if feats.clips[i]["split"] == s]
                                       for s in ("heldout_sentences", "heldout_voices")]) for i in pair] or heldout
    teacher = None
    if args.teacher:  # distillation: regress the Q-Former's output on a trained pool probe's, through its head
        teacher = CTCProbe("pool", args.window, feats.whisper_width, feats.beats_width, units.size, "bert")
        teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
        teacher.eval().requires_grad_(False)
        model.proj.load_state_dict(teacher.proj.state_dict())
        model.head.load_state_dict(teacher.head.state_dict())
        model.proj.requires_grad_(False)
        model.head.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))

    def batch(index):
        whisper_out, beats_out, _, texts = feats.batch(index)
        if args.no_beats:  # zeros: ln_audio gives its bias (0 at init), the Q-Former sees Whisper only
            beats_out = [torch.zeros_like(b) for b in beats_out]
        return whisper_out[:, : args.crop], beats_out, texts

    def wer(index) -> float:
        """Greedy CTC decode, scored as `train.py`'s held-out score is (the challenge's `compute_wer`)."""
        model.eval()
        hyps, refs = [], []
        with torch.no_grad():
            for start in range(0, len(index), 16):
                whisper_out, beats_out, texts = batch(index[start:start + 16])
                for row in model(whisper_out, beats_out).argmax(-1).tolist():
                    hyps.append(units.decode([x for k, x in enumerate(row)
                                              if x != units.size and (k == 0 or row[k - 1] != x)]))
                refs += texts
        model.train()
        return round(compute_wer(hyps, refs)["wer"], 4)

    curve, t0 = [], time.time()
    for step in range(args.steps):
        whisper_out, beats_out, texts = batch(rng.sample(train, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if teacher is not None:
                with torch.no_grad():
                    target = teacher.features(whisper_out, beats_out).float()
                loss = F.mse_loss(model.features(whisper_out, beats_out).float(), target) / target.var()
            else:
                logits = model(whisper_out, beats_out)
        if teacher is None:
            log_probs = logits.float().log_softmax(-1).transpose(0, 1)
            targets = [units.encode(t) for t in texts]
            loss = F.ctc_loss(log_probs, torch.tensor([x for t in targets for x in t]),
                              [log_probs.shape[0]] * len(targets), [len(t) for t in targets], blank=units.size,
                              zero_infinity=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            curve.append({"step": step, "seconds": round(time.time() - t0), "loss": round(loss.item(), 3),
                          "heldout_wer_48": wer(heldout[:48])})
            print(json.dumps(curve[-1]), flush=True)
    if args.save:
        torch.save(model.state_dict(), args.save)
    return {"probe": "ctc" if teacher is None else "distill (loss: MSE / target variance)",
            "adapter": args.adapter, "rank": args.rank, "no_beats": args.no_beats,
            "units": args.units, "window_frames": args.window,
            "crop_frames": args.crop, "clips": args.clips, "init": args.init, "lr": args.lr, "steps": args.steps,
            "threads": torch.get_num_threads(), "seconds": round(time.time() - t0), "curve": curve,
            "train_sentence_wer_48": wer(sentences[:48]), "heldout_wer": wer(heldout)}


def whisper_decoder(args: argparse.Namespace, n: int = 20) -> dict:
    from transformers import AutoTokenizer, WhisperForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    feats = stage2.Features(args.work)
    model = WhisperForConditionalGeneration.from_pretrained(str(args.work / "whisper")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.work / "whisper"))
    single = [i for i, c in enumerate(feats.clips) if c["task"] == "asr" and "segments" not in c]
    result = {"probe": "whisper-decoder", "clips_per_split": n}
    for split in ("heldout", "train"):
        index = [i for i in single if feats.clips[i]["split"] == split][:n]
        hyps = []
        for i in index:
            encoded = torch.from_numpy(feats.whisper[i].astype(np.float32))[None]
            with torch.no_grad():
                out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), max_new_tokens=60)
            hyps.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())
        refs = [feats.clips[i]["text"] for i in index]
        scored = compute_wer(hyps, refs)
        result[split] = {"wer": round(scored["wer"], 4), "exact": sum(item["errors"] == 0 for item in scored["items"]),
                         "examples": [{"ref": r, "hyp": h, "voice": feats.clips[i]["voice"]}
                                      for i, r, h in zip(index, refs, hyps)]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a train.py work folder with finished features and lm")
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(dest="probe", required=True)
    sub.add_parser("whisper-decoder", help="Whisper tiny.en's own decoder on the stored features")
    p = sub.add_parser("ctc", help="an adapter trained with CTC straight onto the text")
    p.add_argument("--adapter", choices=["qformer", "pool"], default="qformer")
    p.add_argument("--units", choices=["bpe", "char"], default="bpe")
    p.add_argument("--window", type=int, default=stage2.WINDOW, help="frames per window (17: SALMONN's 0.333 s)")
    p.add_argument("--crop", type=int, default=1500, help="first encoder frames used (408: 8.2 s, single sentences)")
    p.add_argument("--clips", choices=["single", "all"], default="single", help="all: packed clips too")
    p.add_argument("--init", choices=["bert", "xavier", "quiet-query"], default="bert",
                   help="quiet-query: quiet_query_init (window content dominates the residual at step 0)")
    p.add_argument("--rank", type=int, default=stage2.RANK, help="Q-Former matrices' rank (stage2.RANK)")
    p.add_argument("--no-beats", action="store_true", help="zero BEATs input: the Q-Former sees Whisper only")
    p.add_argument("--save", type=Path, help="write the trained probe's state_dict here")
    p.add_argument("--teacher", type=Path, help="a saved pool probe: train the Q-Former to reproduce its output "
                   "(MSE), through the teacher's own projection and CTC head")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.work = args.work.expanduser().resolve()
    torch.set_num_threads(args.threads)
    result = whisper_decoder(args) if args.probe == "whisper-decoder" else ctc(args)
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(json.dumps(result))
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(runs + [result], indent=1))
    tmp.replace(RESULTS)


if __name__ == "__main__":
    main()
