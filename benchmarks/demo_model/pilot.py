"""Short measured pilots for the issue-17 model choice: the same SALMONN trainee (window-level
Q-Former, projection, LoRA r 8 q/v on a frozen LLM) on the natural-voice pilot data, with
either LLM, for a fixed number of steps; records step times (wall and process CPU), the training
loss curve and teacher-forced token accuracy on both held-out sets, plus greedy transcripts of a
few held-out clips.

    nice -n 15 python benchmarks/demo_model/pilot.py --work /work/demo_data/pilot --llm small --steps 300
    nice -n 15 python benchmarks/demo_model/pilot.py --work /work/demo_data/pilot --llm smollm2 --steps 60

Results are appended to benchmarks/results/demo_pilots.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import stage2  # noqa: E402

LLMS = {"small": (ROOT / "salmonn_export" / "model" / "demo_model" / "llm", "<|end_of_text|>"),
        "smollm2": (Path("/work/demo_data/smollm2/hf"), "<|im_end|>")}
RESULTS = ROOT / "benchmarks" / "results" / "demo_pilots.json"


def heldout(feats: stage2.Features, split: str, n: int) -> list[int]:
    return [i for i, c in enumerate(feats.clips) if c["split"] == split][:n]


def teacher_forced(model: stage2.Trainee, feats: stage2.Features, index: list[int], batch: int) -> float:
    model.eval()
    accs = []
    with torch.no_grad():
        for start in range(0, len(index), batch):
            accs.append(model.loss(*feats.batch(index[start:start + batch]))[1])
    model.train()
    return round(float(np.mean(accs)), 4)


def greedy(model: stage2.Trainee, feats: stage2.Features, index: list[int], max_new: int = 40) -> list[dict]:
    """Greedy transcripts through the trainee (prompt-wrapped speech, no KV cache: pilots only)."""
    from salmonn_export.harness.metrics import compute_wer

    model.eval()
    tok = model.tokenizer
    embed = model.lm.get_input_embeddings()
    end = tok.convert_tokens_to_ids(model.end_sym)
    out = []
    with torch.no_grad():
        for i in index:
            w, b, tasks, texts = feats.batch([i])
            speech = model.speech(w, b)[0]
            before, after = model.prompt_ids["asr"]
            prefix = torch.cat([embed(torch.tensor([tok.bos_token_id] + before)), speech, embed(torch.tensor(after))])
            ids: list[int] = []
            for _ in range(max_new):
                seq = torch.cat([prefix, embed(torch.tensor(ids, dtype=torch.long))]) if ids else prefix
                nxt = int(model.lm(inputs_embeds=seq[None]).logits[0, -1].argmax())
                if nxt == end:
                    break
                ids.append(nxt)
            hyp = tok.decode(ids)
            out.append({"ref": texts[0], "hyp": hyp, "wer": compute_wer([hyp], [texts[0]])["wer"]})
    model.train()
    return out


def ctc_greedy(model: stage2.Trainee, feats: stage2.Features, index: list[int]) -> list[dict]:
    """Best-path CTC transcripts (collapse repeats, drop blanks) of the speech tokens alone."""
    from salmonn_export.harness.metrics import compute_wer

    model.eval()
    out = []
    with torch.no_grad():
        for i in index:
            w, b, _, texts = feats.batch([i])
            best = model.ctc_logits(model.speech(w, b).float())[0].argmax(-1).tolist()
            ids = [t for k, t in enumerate(best) if t != model.tokenizer.pad_token_id and (k == 0 or t != best[k - 1])]
            hyp = model.tokenizer.decode(ids)
            out.append({"ref": texts[0], "hyp": hyp, "wer": compute_wer([hyp], [texts[0]])["wer"]})
    model.train()
    return out


def write_markdown(results: list[dict]) -> None:
    """benchmarks/results/demo_pilots.md: one row per pilot run."""
    lines = ["# Demo model pilots (issue 17)", "", "Written by `benchmarks/demo_model/pilot.py` from `demo_pilots.json`; "
             "CPU seconds are process time (1 thread), wall seconds include the machine's contention "
             "(load average in the last column).", "",
             "| pilot | LLM | LLM params | window × queries | batch | steps | step CPU s | step wall s | loss first→last 10 "
             "| start → end: train / held-out sentences / held-out voices | greedy WER sent. / voices | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:  # hand-recorded partial runs (stopped early) lack some fields: shown as "-"
        first, last = r["curve"][0], r["curve"][-1]
        keys = [k for k in first if k.endswith(("_tf_acc", "_ctc_wer"))]
        metric = "tf acc" if keys and keys[0].endswith("_tf_acc") else "CTC WER"
        losses = r.get("loss_by_10_steps") or []
        loss = (f"{r['loss_first10']} → {r['loss_last10']}" if "loss_first10" in r
                else f"{losses[0]} → {losses[-1]}" if losses else "-")
        greedy = r.get("greedy_wer") or {}
        name = r["pilot"] + (f" ({r.get('ctc_head') or 'cosine'} head, scale {r['ctc_scale']:g})"
                             if r.get("ctc_scale") else "") + (
            " partial" if r.get("partial") else "")
        lines.append(
            f"| {name} | {r['llm']} | {r['llm_params'] / 1e6:.1f} M | {r['window_frames']} × {r['queries']} "
            f"| {r['batch']} | {r['steps']} | {r.get('step_cpu_s_median', r.get('step_cpu_s_mean', '-'))} "
            f"| {r.get('step_wall_s_median', '-')} | {loss} | {metric}: "
            + " / ".join(str(first[k]) for k in keys) + " → " + " / ".join(str(last[k]) for k in keys)
            + f" (step {last['step']}) | {greedy.get('heldout_sentences', '-')} / {greedy.get('heldout_voices', '-')} "
            f"| {r.get('load_average_1min', '-')} |")
    (RESULTS.with_suffix(".md")).write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--llm", choices=sorted(LLMS), required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=8, help="Q-Former window in Whisper frames (50 per second)")
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ctc-scale", type=float, default=4.0, help="initial CTC logit scale (ctc mode)")
    ap.add_argument("--ctc-head", choices=["cosine", "linear"], default="cosine")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--n-greedy", type=int, default=6)
    ap.add_argument("--mode", choices=["salmonn", "ctc"], default="salmonn",
                    help="salmonn: the LLM's loss on the transcript; ctc: only the speech tokens, CTC against the "
                         "LLM's input embeddings (Trainee.ctc_loss; no LLM forward)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    feats = stage2.Features(args.work)
    llm, end_sym = LLMS[args.llm]
    model = stage2.Trainee(llm, feats.whisper_width, feats.beats_width, window=args.window, queries=args.queries,
                           end_sym=end_sym, ctc_weight=1.0 if args.mode == "ctc" else 0.0, ctc_scale=args.ctc_scale,
                           ctc_head=args.ctc_head)
    if args.mode == "ctc":
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    train = [i for i, c in enumerate(feats.clips) if c["split"] == "train" and c["task"] == "asr"]
    sets = {name: heldout(feats, name, args.n_eval) for name in ("heldout_sentences", "heldout_voices")}
    train_probe = train[: args.n_eval]
    words = [len(feats.clips[i]["text"].split()) for i in train]
    tokens = [len(model.tokenizer(feats.clips[i]["text"], add_special_tokens=False).input_ids) for i in train]
    curve = []

    def evaluate(step: int, t_wall: float, t_cpu: float) -> None:
        point = {"step": step, "wall_s": round(t_wall, 1), "cpu_s": round(t_cpu, 1)}
        if args.mode == "ctc":
            point.update({f"{k}_ctc_wer": round(float(np.mean([e["wer"] for e in ctc_greedy(model, feats, v)])), 3)
                          for k, v in {"train": train_probe, **sets}.items()})
        else:
            point["train_tf_acc"] = teacher_forced(model, feats, train_probe, args.batch)
            point.update({f"{k}_tf_acc": teacher_forced(model, feats, v, args.batch) for k, v in sets.items()})
        curve.append(point)
        print(json.dumps(point), flush=True)

    rng = random.Random(0)
    losses, step_wall, step_cpu = [], [], []
    t0, c0 = time.time(), time.process_time()
    evaluate(0, 0.0, 0.0)
    eval_wall = eval_cpu = 0.0
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch)
        tw, tc = time.time(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if args.mode == "ctc":
                w, b, tasks, texts = feats.batch(batch)
                loss = model.ctc_loss(model.speech(w, b), tasks, texts)
            else:
                loss, _ = model.loss(*feats.batch(batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step_wall.append(time.time() - tw)
        step_cpu.append(time.process_time() - tc)
        losses.append(loss.item())
        if step % 10 == 0:
            print(json.dumps({"step": step, "loss": round(float(np.mean(losses[-10:])), 3),
                              "step_wall_s": round(float(np.mean(step_wall[-10:])), 2)}), flush=True)
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            ew, ec = time.time(), time.process_time()
            evaluate(step, time.time() - t0 - eval_wall, time.process_time() - c0 - eval_cpu)
            eval_wall += time.time() - ew
            eval_cpu += time.process_time() - ec
    decode = ctc_greedy if args.mode == "ctc" else greedy
    examples = {k: decode(model, feats, v[: args.n_greedy]) for k, v in sets.items()}
    result = {
        "pilot": args.mode, "llm": args.llm, "llm_params": sum(p.numel() for n, p in model.lm.named_parameters()
                                                                            if ".lora_" not in n),
        "window_frames": args.window, "queries": args.queries, "ctc_scale": args.ctc_scale if args.mode == "ctc" else None,
        "ctc_head": args.ctc_head if args.mode == "ctc" else None,
        "speech_tokens": (1500 - args.window) // args.window * args.queries + args.queries,
        "batch": args.batch, "steps": args.steps, "lr": args.lr, "threads": args.threads,
        "train_clips": len(train), "train_words_per_clip": round(float(np.mean(words)), 1),
        "llm_tokens_per_word": round(sum(tokens) / sum(words), 3),
        "trainable_params": sum(p.numel() for p in params),
        "step_wall_s_median": round(float(np.median(step_wall)), 3),
        "step_cpu_s_median": round(float(np.median(step_cpu)), 3),
        "loss_first10": round(float(np.mean(losses[:10])), 3), "loss_last10": round(float(np.mean(losses[-10:])), 3),
        "curve": curve,
        "greedy_wer": {k: round(float(np.mean([e["wer"] for e in v])), 3) for k, v in examples.items()},
        "greedy_examples": {k: v[:3] for k, v in examples.items()},
        "load_average_1min": round(__import__("os").getloadavg()[0], 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(existing + [result], indent=1))
    write_markdown(existing + [result])
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "greedy_examples")}))


if __name__ == "__main__":
    main()
