"""Where does the shipped demo SALMONN lose the words? Stage-by-stage WER on the held-out clips.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_model/diagnose.py --work /work/demo_data/natural
    # writes benchmarks/results/demo_diagnosis.{json,md}; per-stage decodes are cached in --cache,
    # so a rerun after an interruption only redoes the missing stages (--fresh: recompute all)

The demo (benchmarks/demo_model/train_natural.py) is trained in stages; each stage's output is kept in
the work folder. This script decodes the same clips at every point of the acoustic path and through
the shipped model, all scored with the challenge's WER (`salmonn_export.harness.metrics.compute_wer`,
Whisper's English normaliser), on three sets of single-sentence clips:

- `heldout_sentences`: sentences no stage saw, training voices (clips.json split of that name);
- `heldout_voices`: other unseen sentences, the two unseen voices (piper joe, flite rms);
- `train_seen`: single-sentence training clips every stage trained on (the memorisation reference).

Stages (the speech path as the training stages left it):

1. `whisper_decoder`: Whisper tiny.en's own decoder (greedy) on the stored encoder features: what a
   decoder trained on 680 k hours reads out of these features (a practical ceiling).
2. `teacher_ctc`: greedy CTC of the teacher (teacher.pt: mean of each 6-frame window of normed
   Whisper frames → MLP → projection → linear head over the LLM's BPE vocabulary, blank = [PAD]).
3. `adapter_ctc`: greedy CTC of the adapter (adapter.pt: ln_speech/ln_audio, low-rank window-level
   Q-Former with one query, projection, and its training-only linear CTC head). The projection's
   output is exactly what the LLM receives as speech embeddings, so this is what those embeddings
   carry, read out by a linear head.
4. `reader_qformer_adapter_head`: the shipped model's speech embeddings (its Q-Former, ln's and
   projection went on training in the reader stage, with no CTC loss) through adapter.pt's CTC head,
   unchanged. This mixes information loss with drift of the embedding space away from that head;
   `probe` below separates the two.
5. `reader_greedy` / `reader_beam4`: the shipped model (materialized from salmonn_export/model/
   demo_model, PyTorch reference, `SALMONN.transcribe`), greedy and the config's beam 4 (the scored
   setting: scores.json).

Extra measurements:

- `features_check`: the stored whisper.f16 / beats rows against a fresh computation with the
  features stage's code (`data.encoder_features`: WhisperFeatureExtractor padding to 30 s, encoder
  with sdpa attention, fp16 storage) for a few held-out clips.
- `ctc_nll`: the reference's CTC negative log-likelihood per target token under each CTC head
  (independent of greedy decoding).
- `probe` (`--probe-steps`, 0 to skip): a linear CTC head refitted, from adapter.pt's head, on the
  frozen speech embeddings of (a) the adapter and (b) the shipped reader, same clips, steps and
  learning rate: does the reader's embedding still carry what the adapter's did?
- `teacher_forced`: the shipped model's teacher-forced next-token accuracy / NLL on the held-out
  transcripts, with each clip's own speech and with another clip's speech (the LLM's prior in the
  same prompt), i.e. how much the speech moves the reader's predictions.
- `lm_text`: text-only NLL per token and next-token accuracy of the LLM before drills
  (llm_pretrained), after drills (llm: the reader's starting point) and the shipped base LLM
  (llm_adapted), on the held-out sentences and on WordNet training sentences; and the share of
  held-out words that never occur in the training text.
- `word_overlap`: of the reference words the adapter's CTC gets right (aligned matches), how many
  the shipped reader (beam 4) also gets, and vice versa.

Everything runs on CPU with one torch thread (a few minutes per stage, ~25 min in all with the probe).
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reader  # noqa: E402
import stage2  # noqa: E402

from salmonn_export.harness.metrics import compute_wer, edit_distance, wer_tokens  # noqa: E402

END_SYM = "<|end_of_text|>"
WINDOW_FRAMES = 6  # train_natural.WINDOW_FRAMES: the shipped windowing (0.12 s, one query)
SETS = ("heldout_sentences", "heldout_voices", "train_seen")
CTC_STAGES = ("teacher_ctc", "adapter_ctc", "reader_qformer_adapter_head")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/demo_data/natural"), help="train_natural.py work folder")
    ap.add_argument("--artifact", type=Path, default=ROOT / "salmonn_export" / "model" / "demo_model",
                    help="the shipped demo artifact (materialized into --cache)")
    ap.add_argument("--n", type=int, default=100, help="clips per held-out set (100 = all)")
    ap.add_argument("--train-n", type=int, default=50, help="single-sentence training clips (train_seen)")
    ap.add_argument("--check-features", type=int, default=4, help="held-out clips whose features are recomputed")
    ap.add_argument("--probe-steps", type=int, default=1000, help="linear CTC head refit steps (0: skip the probe)")
    ap.add_argument("--probe-clips", type=int, default=2000, help="training ASR clips the probe draws from")
    ap.add_argument("--seed", type=int, default=0, help="train_natural.py's seed (the validation split)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/salmonn_demo_diagnosis"))
    ap.add_argument("--fresh", action="store_true", help="ignore cached stage results")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_diagnosis")
    return ap.parse_args()


# ---------------------------------------------------------------- clips and scoring

def pick_clips(feats: stage2.Features, n: int, train_n: int, seed: int) -> dict[str, list[int]]:
    """Clip indices per set. train_seen: single-sentence clips of the training split that no stage
    held out for validation (reader._split), so teacher, adapter and reader all trained on them."""
    sets = {s: [i for i, c in enumerate(feats.clips) if c["split"] == s][:n] for s in SETS[:2]}
    train, _ = reader._split(feats, seed)
    single = [i for i in train if feats.clips[i]["task"] == "asr" and "segments" not in feats.clips[i]]
    sets["train_seen"] = random.Random(seed).sample(single, min(train_n, len(single)))
    return sets


def align(ref: list[str], hyp: list[str]) -> tuple[dict, list[bool]]:
    """Levenshtein alignment: substitution/deletion/insertion counts and, per reference word,
    whether it is matched exactly."""
    d = np.zeros((len(ref) + 1, len(hyp) + 1), dtype=np.int32)
    d[:, 0] = np.arange(len(ref) + 1)
    d[0, :] = np.arange(len(hyp) + 1)
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            d[i, j] = min(d[i - 1, j] + 1, d[i, j - 1] + 1, d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]))
    i, j = len(ref), len(hyp)
    counts = {"sub": 0, "del": 0, "ins": 0}
    hit = [False] * len(ref)
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i, j] == d[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            if ref[i - 1] == hyp[j - 1]:
                hit[i - 1] = True
            else:
                counts["sub"] += 1
            i, j = i - 1, j - 1
        elif i > 0 and d[i, j] == d[i - 1, j] + 1:
            counts["del"] += 1
            i -= 1
        else:
            counts["ins"] += 1
            j -= 1
    return counts, hit


def score(hyps: list[str], refs: list[str], voices: list[str]) -> dict:
    """compute_wer plus the error kinds, exact-match count and per-voice WER."""
    wer = compute_wer(hyps, refs)
    kinds = {"sub": 0, "del": 0, "ins": 0}
    for h, r in zip(hyps, refs):
        counts, _ = align(wer_tokens(r), wer_tokens(h))
        for k in kinds:
            kinds[k] += counts[k]
    per_voice = {}
    for v in sorted(set(voices)):
        idx = [k for k, x in enumerate(voices) if x == v]
        per_voice[v] = {"n": len(idx), "wer": round(compute_wer([hyps[k] for k in idx], [refs[k] for k in idx])["wer"], 4)}
    # character error rate over the same normalised words (a BPE-level CTC read-out can be half right
    # inside a word, e.g. "heield" for "his shield", which WER counts as wholly wrong)
    chars = [(" ".join(wer_tokens(r)), " ".join(wer_tokens(h))) for h, r in zip(hyps, refs)]
    cer = sum(edit_distance(list(r), list(h)) for r, h in chars) / sum(len(r) for r, _ in chars)
    return {"n": len(refs), "wer": round(wer["wer"], 4), "cer": round(cer, 4), "errors": wer["errors"],
            "ref_words": wer["ref_words"], **kinds, "exact": sum(item["errors"] == 0 for item in wer["items"]),
            "hyp_words": sum(len(wer_tokens(h)) for h in hyps), "per_voice": per_voice}


# ---------------------------------------------------------------- CTC read-outs

def ctc_greedy(logits: torch.Tensor, blank: int) -> list[int]:
    """Best path: argmax per window, repeats merged, blanks dropped."""
    out, prev = [], None
    for t in logits.argmax(-1).tolist():
        if t != prev and t != blank:
            out.append(t)
        prev = t
    return out


def ctc_readout(logits: torch.Tensor, texts: list[str], tok, blank: int) -> tuple[list[str], list[float], dict]:
    """Greedy transcripts, per-clip CTC NLL per reference token, and blank/emission statistics of
    [B, T, V] logits."""
    hyps, nll = [], []
    log_probs = logits.float().log_softmax(-1)
    argmax = log_probs.argmax(-1)
    for b, text in enumerate(texts):
        hyps.append(tok.decode(ctc_greedy(logits[b], blank)))
        target = tok(text, add_special_tokens=False).input_ids
        loss = F.ctc_loss(log_probs[b:b + 1].transpose(0, 1), torch.tensor([target]), [log_probs.shape[1]],
                          [len(target)], blank=blank, reduction="sum", zero_infinity=True)
        nll.append(loss.item() / len(target))
    stats = {"blank_frames": (argmax == blank).float().mean().item()}
    return hyps, nll, stats


def load_teacher(work: Path, feats: stage2.Features) -> reader.PoolTeacher:
    teacher = reader._teacher(work / "llm", feats, WINDOW_FRAMES)
    teacher.load_state_dict(torch.load(work / "teacher.pt", weights_only=True))
    return teacher.eval()


def load_adapter(work: Path, feats: stage2.Features) -> stage2.Trainee:
    """The adapter stage's Trainee (linear CTC head) with adapter.pt's tensors."""
    model = reader.make_trainee(work, work / "llm", END_SYM, WINDOW_FRAMES, 1, feats, ctc_head="linear")
    state = torch.load(work / "adapter.pt", weights_only=True)
    own = dict(model.named_parameters())
    missing = [k for k in own if k not in state and ".lora_" not in k and not k.startswith(("llama_model.", "lm."))]
    if missing:
        raise SystemExit(f"adapter.pt lacks {missing[:4]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return model.eval()


def reader_speech(salmonn, whisper: torch.Tensor, beats: list[torch.Tensor]) -> torch.Tensor:
    """The shipped model's speech embeddings from stored encoder outputs, fused exactly as in
    training (stage2.window_queries: each clip's BEATs rows layer-normed, then zero-padded to
    Whisper's 1500 frames), then its Q-Former and projection (SALMONN.qformer_project)."""
    speech = salmonn.ln_speech(whisper)
    audio = torch.stack([F.pad(salmonn.ln_audio(b), (0, 0, 0, speech.shape[1] - b.shape[0])) for b in beats])
    return salmonn.qformer_project(torch.cat([speech, audio], dim=-1))


def speech_tokens(fn, feats: stage2.Features, index: list[int], batch: int = 16) -> torch.Tensor:
    """fn(whisper, beats) → [B, T, hidden] for every clip in `index`, as one fp16 tensor."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(index), batch):
            w, b, _, _ = feats.batch(index[start:start + batch])
            out.append(fn(w, b).half())
            if start % (16 * batch) == 0:  # drop the mapped pages read so far (4.8 GB file): a fresh map
                feats.whisper = np.memmap(feats.whisper.filename, dtype=np.float16, mode="r", shape=feats.whisper.shape)
    return torch.cat(out)


# ---------------------------------------------------------------- the stages

def features_check(work: Path, feats: stage2.Features, index: list[int]) -> dict:
    """Recompute Whisper and BEATs outputs of `index` with data.encoder_features' code; compare."""
    from transformers import WhisperModel

    from salmonn_export.audio import load_audio
    from salmonn_export.model.beats import load_beats
    from salmonn_export.model.whisper import load_feature_extractor, whisper_features

    extractor = load_feature_extractor(work / "whisper")
    whisper = WhisperModel.from_pretrained(str(work / "whisper"), attn_implementation="sdpa").encoder.eval()
    beats = load_beats(work / "beats.pt").eval()
    worst_w = worst_b = 0.0
    scale = []
    with torch.inference_mode():
        for i in index:
            wave = load_audio(work / feats.clips[i]["path"])
            mel = whisper_features(extractor, wave)
            fresh = whisper(mel[None]).last_hidden_state[0].numpy().astype(np.float16).astype(np.float32)
            stored = feats.whisper[i].astype(np.float32)
            worst_w = max(worst_w, float(np.abs(fresh - stored).max()))
            scale.append(float(np.abs(stored).mean()))
            raw = torch.from_numpy(wave)[None]
            b = beats.extract_features(raw, torch.zeros_like(raw, dtype=torch.bool))[0].numpy().astype(np.float16)
            worst_b = max(worst_b, float(np.abs(b.astype(np.float32) - feats.beats[i].astype(np.float32)).max()))
    return {"clips": index, "mel_frames": int(mel.shape[-1]), "whisper_max_abs_diff": worst_w,
            "whisper_mean_abs_value": round(float(np.mean(scale)), 4), "beats_max_abs_diff": worst_b}


def run_ctc_stages(work: Path, feats: stage2.Features, sets: dict, salmonn) -> dict:
    teacher = load_teacher(work, feats)
    adapter = load_adapter(work, feats)
    tok, blank = adapter.tokenizer, adapter.tokenizer.pad_token_id
    heads = {
        "teacher_ctc": lambda w, b: teacher.head(teacher.proj(teacher.features(w))),
        "adapter_ctc": lambda w, b: adapter.ctc_logits(adapter.speech(w, b)),
        "reader_qformer_adapter_head": lambda w, b: adapter.ctc_logits(reader_speech(salmonn, w, b)),
    }
    result = {}
    for stage, fn in heads.items():
        t0 = time.time()
        result[stage] = {}
        for name, index in sets.items():
            hyps, nll, blanks = [], [], []
            with torch.inference_mode():
                for start in range(0, len(index), 16):
                    w, b, _, texts = feats.batch(index[start:start + 16])
                    h, n, stats = ctc_readout(fn(w, b), texts, tok, blank)
                    hyps += h
                    nll += n
                    blanks.append(stats["blank_frames"] * len(texts))
            result[stage][name] = {"hyps": hyps, "ctc_nll_per_token": round(float(np.mean(nll)), 4),
                                   "blank_frames": round(sum(blanks) / len(index), 4)}
        result[stage]["seconds"] = round(time.time() - t0, 1)
    # CTC units: the LLM's BPE tokens; greedy decoding joins them back into text with the tokenizer
    refs = [feats.clips[i]["text"].lower() for s in sets.values() for i in s]
    result["bpe_roundtrip_exact"] = sum(tok.decode(tok(r, add_special_tokens=False).input_ids) == r for r in refs)
    result["bpe_roundtrip_n"] = len(refs)
    result["bpe_tokens_per_word"] = round(sum(len(tok(r, add_special_tokens=False).input_ids) for r in refs)
                                          / sum(len(r.split()) for r in refs), 3)
    return result


def run_whisper_decoder(work: Path, feats: stage2.Features, sets: dict) -> dict:
    from transformers import AutoTokenizer, WhisperForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    model = WhisperForConditionalGeneration.from_pretrained(str(work / "whisper")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(work / "whisper"))
    result, t0 = {}, time.time()
    for name, index in sets.items():
        hyps = []
        for start in range(0, len(index), 8):
            batch = index[start:start + 8]
            encoded = torch.from_numpy(np.stack([feats.whisper[i] for i in batch]).astype(np.float32))
            with torch.inference_mode():
                out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), max_new_tokens=60,
                                     num_beams=1, do_sample=False)
            hyps += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
        result[name] = {"hyps": hyps}
    result["seconds"] = round(time.time() - t0, 1)
    return result


def run_reader(salmonn, work: Path, feats: stage2.Features, sets: dict) -> dict:
    result = {}
    for stage, beams in (("reader_greedy", 1), ("reader_beam4", None)):
        t0 = time.time()
        result[stage] = {}
        for name, index in sets.items():
            paths = [work / feats.clips[i]["path"] for i in index]
            result[stage][name] = {"hyps": salmonn.transcribe(paths, "asr", batch_size=8, num_beams=beams)}
        result[stage]["seconds"] = round(time.time() - t0, 1)
    return result


def teacher_forced(salmonn, feats: stage2.Features, sets: dict) -> dict:
    """Next-token accuracy / NLL of the shipped model on each transcript (+ end_sym) after the ASR
    prompt with (a) the clip's own speech embeddings, (b) the next clip's (the prior alone)."""
    tok = salmonn.llama_tokenizer
    prompt = salmonn.prompts_for(["asr"])
    end_sym = salmonn.config.generate.end_sym
    result = {}
    for name, index in sets.items():
        with torch.inference_mode():
            w, b, _, texts = feats.batch(index)
            speech = torch.cat([reader_speech(salmonn, w[k:k + 16], b[k:k + 16]) for k in range(0, len(index), 16)])
            row = {}
            for kind, order in (("own_speech", list(range(len(index)))),
                                ("other_clip_speech", [(k + 1) % len(index) for k in range(len(index))])):
                correct = total = 0
                nll = 0.0
                for k, text in enumerate(texts):
                    embeds, _ = salmonn.prompt_wrap(speech[order[k]:order[k] + 1], prompt)
                    target = torch.tensor(tok(text + end_sym, add_special_tokens=False).input_ids)
                    full = torch.cat([embeds, salmonn.embed_tokens(target[None])], dim=1)
                    logits = salmonn.causal_lm(inputs_embeds=full).logits[0, embeds.shape[1] - 1:-1]
                    correct += int((logits.argmax(-1) == target).sum())
                    nll += float(F.cross_entropy(logits.float(), target, reduction="sum"))
                    total += len(target)
                row[kind] = {"token_accuracy": round(correct / total, 4), "nll_per_token": round(nll / total, 4)}
        result[name] = row
    return result


def lm_text(work: Path, feats: stage2.Features, sets: dict, seed: int, n_train: int = 200) -> dict:
    """Text-only NLL / next-token accuracy of the LLM checkpoints on held-out vs training sentences."""
    from transformers import AutoModelForCausalLM

    from salmonn_export.model.llm import load_tokenizer

    split = json.loads((work / "sentences.json").read_text())
    train_sentences = split["train"]
    try:  # WordNet examples among the training sentences: the same source as the held-out ones
        import natural_data

        _, wordnet_only = natural_data.corpus()
        pool = sorted(set(wordnet_only) & set(train_sentences))
        source = "WordNet examples (no fortune) among the training sentences"
    except SystemExit:
        pool, source = train_sentences, "all training sentences (WordNet corpus not installed)"
    texts = {name: [feats.clips[i]["text"].lower() for i in index] for name, index in sets.items() if name != "train_seen"}
    texts["train_text"] = random.Random(seed).sample(pool, min(n_train, len(pool)))
    train_words = {w for s in train_sentences for w in s.split()}
    result = {"train_text_source": source, "models": {}, "oov": {}}
    for name, sentences in texts.items():
        words = [w for s in sentences for w in s.split()]
        result["oov"][name] = {"words": len(words), "not_in_training_text": sum(w not in train_words for w in words)}
    for folder in ("llm_pretrained", "llm", "llm_adapted"):
        tok = load_tokenizer(work / folder)
        model = AutoModelForCausalLM.from_pretrained(str(work / folder), dtype=torch.float32).eval()
        bos = model.config.bos_token_id
        rows = {}
        for name, sentences in texts.items():
            correct = total = 0
            nll = 0.0
            with torch.inference_mode():
                for s in sentences:
                    ids = torch.tensor([[bos] + tok(s + END_SYM, add_special_tokens=False).input_ids])
                    logits = model(ids).logits[0, :-1]
                    correct += int((logits.argmax(-1) == ids[0, 1:]).sum())
                    nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                    total += ids.shape[1] - 1
            rows[name] = {"n": len(sentences), "token_accuracy": round(correct / total, 4),
                          "nll_per_token": round(nll / total, 4), "perplexity": round(float(np.exp(nll / total)), 1)}
        result["models"][folder] = rows
    return result


def probe(work: Path, feats: stage2.Features, sets: dict, salmonn, steps: int, n_clips: int, seed: int,
          lr: float = 2e-3, batch: int = 16) -> dict:
    """Refit a linear CTC head (from adapter.pt's) on frozen speech embeddings of the adapter and of
    the shipped reader: same training clips, steps, lr; greedy held-out WER and CTC NLL after."""
    adapter = load_adapter(work, feats)
    tok, blank = adapter.tokenizer, adapter.tokenizer.pad_token_id
    train, _ = reader._split(feats, seed)
    asr = [i for i in train if feats.clips[i]["task"] == "asr"]
    pool = sorted(random.Random(seed + 7).sample(asr, min(n_clips, len(asr))))
    targets = {i: tok(feats.clips[i]["text"].lower(), add_special_tokens=False).input_ids for i in pool}
    sources = {"adapter": lambda w, b: adapter.speech(w, b),
               "reader": lambda w, b: reader_speech(salmonn, w, b)}
    result = {"steps": steps, "batch": batch, "lr": lr, "train_clips": len(pool)}
    for name, fn in sources.items():
        t0 = time.time()
        tokens = speech_tokens(fn, feats, pool)
        seconds_tokens = time.time() - t0
        head = torch.nn.Linear(tokens.shape[-1], adapter.ctc_linear.out_features)
        head.load_state_dict(adapter.ctc_linear.state_dict())
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
        losses = []
        for step in range(steps):
            pick = random.Random(seed * 3_000_017 + step).sample(range(len(pool)), batch)
            log_probs = head(tokens[pick].float()).log_softmax(-1).transpose(0, 1)
            tgt = [targets[pool[k]][: log_probs.shape[0]] for k in pick]
            loss = F.ctc_loss(log_probs, torch.tensor([x for t in tgt for x in t]), [log_probs.shape[0]] * batch,
                              [len(t) for t in tgt], blank=blank, zero_infinity=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        row = {"seconds": round(time.time() - t0, 1), "seconds_embeddings": round(seconds_tokens, 1),
               "train_ctc_loss_per_100_steps": [round(float(np.mean(losses[k:k + 100])), 3)
                                                for k in range(0, len(losses), 100)]}
        for set_name, index in sets.items():
            held = speech_tokens(fn, feats, index)
            texts = [feats.clips[i]["text"].lower() for i in index]
            with torch.inference_mode():
                hyps, nll, stats = ctc_readout(head(held.float()), texts, tok, blank)
            row[set_name] = {"hyps": hyps, "ctc_nll_per_token": round(float(np.mean(nll)), 4),
                             "blank_frames": round(stats["blank_frames"], 4)}
        result[name] = row
    return result


# ---------------------------------------------------------------- report

def word_overlap(refs: list[str], a_hyps: list[str], b_hyps: list[str]) -> dict:
    """Reference words matched (alignment hits) by A, by B, by both."""
    a = b = both = total = 0
    for r, ha, hb in zip(refs, a_hyps, b_hyps):
        ref = wer_tokens(r)
        _, hit_a = align(ref, wer_tokens(ha))
        _, hit_b = align(ref, wer_tokens(hb))
        total += len(ref)
        a += sum(hit_a)
        b += sum(hit_b)
        both += sum(x and y for x, y in zip(hit_a, hit_b))
    return {"ref_words": total, "hit_a": a, "hit_b": b, "hit_both": both, "hit_a_only": a - both, "hit_b_only": b - both}


STAGE_NOTES = {
    "whisper_decoder": "Whisper tiny.en's own decoder on the stored encoder features (greedy)",
    "teacher_ctc": "teacher.pt: pooled 6-frame windows → MLP → CTC head (greedy)",
    "adapter_ctc": "adapter.pt: Q-Former speech embeddings → its CTC head (greedy)",
    "reader_qformer_adapter_head": "shipped reader's speech embeddings → adapter.pt's CTC head, unchanged",
    "reader_greedy": "shipped model, PyTorch reference, greedy",
    "reader_beam4": "shipped model, PyTorch reference, beam 4 (the scored setting)",
    "probe_refit_head_on_adapter_embeddings": "linear CTC head refitted on frozen adapter embeddings",
    "probe_refit_head_on_reader_embeddings": "linear CTC head refitted on frozen shipped-reader embeddings",
}


def write_markdown(path: Path, report: dict) -> None:
    rows = report["stages"]
    lines = ["# Demo SALMONN: where the words are lost", "",
             f"`benchmarks/demo_model/diagnose.py`, work folder `{report['work']}`. WER (CER) with the "
             "challenge's `compute_wer` normaliser. Sets: unseen sentences in training voices / unseen "
             "sentences in unseen voices (piper joe, flite rms) / single-sentence training clips seen by "
             "every stage. CTC NLL: the reference's CTC negative log-likelihood per BPE token.", "",
             "| stage | unseen sentences | unseen voices | train (seen) | n | CTC NLL/token (unseen sent. / voices) |",
             "|---|---|---|---|---|---|"]
    for stage, by_set in rows.items():
        cells = [f"{by_set[s]['wer'] * 100:.1f} % ({by_set[s]['cer'] * 100:.0f} %)" if s in by_set else "-"
                 for s in SETS]
        n = "/".join(str(by_set[s]["n"]) for s in SETS if s in by_set)
        nll = " / ".join(str(by_set[s]["ctc_nll_per_token"]) for s in SETS[:2]
                         if "ctc_nll_per_token" in by_set.get(s, {}))
        lines.append(f"| {stage} | {' | '.join(cells)} | {n} | {nll or '-'} |")
    lines.append("")
    lines += [f"- `{stage}`: {STAGE_NOTES.get(stage, '')}" for stage in rows]
    shipped = report.get("shipped_scores", {})
    if shipped:
        lines += ["", f"The shipped `scores.json` (beam 4, same 100 + 100 clips): {shipped['heldout_sentences']:.1f} % / "
                      f"{shipped['heldout_voices']:.1f} %."]
    tf = report.get("teacher_forced")
    if tf:
        lines += ["", "## Teacher-forced (shipped model, transcript after the ASR prompt)", "",
                  "| set | token acc., own speech | token acc., another clip's speech | NLL own / other |",
                  "|---|---|---|---|"]
        for name, row in tf.items():
            own, other = row["own_speech"], row["other_clip_speech"]
            lines.append(f"| {name} | {own['token_accuracy']:.3f} | {other['token_accuracy']:.3f} | "
                         f"{own['nll_per_token']:.2f} / {other['nll_per_token']:.2f} |")
    lm = report.get("lm_text")
    if lm:
        names = list(next(iter(lm["models"].values())))
        lines += ["", f"## The LLM on text alone (train_text: {lm['train_text_source']})", "",
                  "| LLM | " + " | ".join(f"{n}: acc. / ppl" for n in names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for model, row in lm["models"].items():
            lines.append(f"| {model} | " + " | ".join(f"{row[n]['token_accuracy']:.3f} / {row[n]['perplexity']}"
                                                      for n in names) + " |")
        lines += ["", "Words not in the training text: " + ", ".join(
            f"{n} {v['not_in_training_text']}/{v['words']}" for n, v in lm["oov"].items()) + "."]
    overlap = report.get("word_overlap")
    if overlap:
        lines += ["", "## Reference words matched: adapter CTC (a) vs shipped reader beam 4 (b)", "",
                  "| set | ref words | a | b | both | a only | b only |", "|---|---|---|---|---|---|---|"]
        for name in SETS:
            o = overlap[name]
            lines.append(f"| {name} | {o['ref_words']} | {o['hit_a']} | {o['hit_b']} | {o['hit_both']} | "
                         f"{o['hit_a_only']} | {o['hit_b_only']} |")
    lines += ["", "## Example decodes (first 3 unseen-sentence clips)", ""]
    for stage, by_set in rows.items():
        lines.append(f"**{stage}**")
        lines.append("")
        for ex in by_set["heldout_sentences"]["examples"][:3]:
            lines.append(f"- `{ex['ref']}` → `{ex['hyp']}`")
        lines.append("")
    lines += ["## Checks", "", f"- features: `{json.dumps(report['features_check'])}`",
              f"- BPE units: `{json.dumps(report['bpe'])}`"]
    if "probe_training" in report:
        lines.append(f"- probe: `{json.dumps(report['probe_settings'])}`, training CTC loss per 100 steps "
                     f"`{json.dumps({k: v['train_ctc_loss_per_100_steps'] for k, v in report['probe_training'].items()})}`")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    work = args.work.resolve()
    args.cache.mkdir(parents=True, exist_ok=True)
    feats = stage2.Features(work)
    sets = pick_clips(feats, args.n, args.train_n, args.seed)
    refs = {name: [feats.clips[i]["text"].lower() for i in index] for name, index in sets.items()}
    voices = {name: [feats.clips[i]["voice"] for i in index] for name, index in sets.items()}

    def cached(name: str, fn):
        path = args.cache / f"{name}.json"
        if path.exists() and not args.fresh:
            return json.loads(path.read_text())
        t0 = time.time()
        value = fn()
        path.write_text(json.dumps(value))
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
        return value

    salmonn_holder = {}

    def shipped():
        if "model" not in salmonn_holder:
            from salmonn_export.model.demo import materialize_demo
            from salmonn_export.model.salmonn import load_salmonn

            folder = materialize_demo(args.cache / "materialized", artifact=args.artifact)
            salmonn_holder["model"] = load_salmonn(folder / "config.yaml")
        return salmonn_holder["model"]

    report = {"work": str(work), "artifact": str(args.artifact), "clips": sets}
    report["features_check"] = cached("features_check",
                                      lambda: features_check(work, feats, sets["heldout_sentences"][:args.check_features]))
    outputs = {}
    outputs["whisper_decoder"] = cached("whisper_decoder", lambda: run_whisper_decoder(work, feats, sets))
    ctc = cached("ctc", lambda: run_ctc_stages(work, feats, sets, shipped()))
    report["bpe"] = {k: ctc.pop(k) for k in ("bpe_roundtrip_exact", "bpe_roundtrip_n", "bpe_tokens_per_word")}
    outputs.update(ctc)
    outputs.update(cached("reader", lambda: run_reader(shipped(), work, feats, sets)))
    if args.probe_steps:
        probed = cached("probe", lambda: probe(work, feats, sets, shipped(), args.probe_steps, args.probe_clips, args.seed))
        for name in ("adapter", "reader"):
            outputs[f"probe_refit_head_on_{name}_embeddings"] = probed[name]
        report["probe_settings"] = {k: probed[k] for k in ("steps", "batch", "lr", "train_clips")}
        report["probe_training"] = {name: {k: v for k, v in probed[name].items() if k not in SETS}
                                    for name in ("adapter", "reader")}
    report["teacher_forced"] = cached("teacher_forced", lambda: teacher_forced(shipped(), feats, sets))
    report["lm_text"] = cached("lm_text", lambda: lm_text(work, feats, sets, args.seed))

    stages = {}
    for stage, out in outputs.items():
        stages[stage] = {}
        for name in SETS:
            if name not in out:
                continue
            hyps = out[name]["hyps"]
            stages[stage][name] = {**score(hyps, refs[name], voices[name]),
                                   **{k: v for k, v in out[name].items() if k != "hyps"},
                                   "examples": [{"ref": r, "hyp": h} for r, h in zip(refs[name], hyps)][:3]}
        stages[stage]["seconds"] = out.get("seconds")
    report["stages"] = {s: {k: v for k, v in by.items() if k != "seconds"} for s, by in stages.items()}
    report["seconds"] = {s: by["seconds"] for s, by in stages.items()}
    report["hyps"] = {stage: {name: out[name]["hyps"] for name in SETS if name in out} for stage, out in outputs.items()}
    report["refs"] = refs
    report["word_overlap"] = {name: word_overlap(refs[name], outputs["adapter_ctc"][name]["hyps"],
                                                 outputs["reader_beam4"][name]["hyps"])
                              for name in SETS}
    report["word_overlap"]["note"] = "a = adapter_ctc (greedy), b = reader_beam4 (shipped)"
    scores_path = args.artifact / "scores.json"
    if scores_path.exists():
        scores = json.loads(scores_path.read_text())
        report["shipped_scores"] = {s: scores[s]["wer_percent"] for s in SETS[:2] if s in scores}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    write_markdown(args.out.with_suffix(".md"), report)
    for stage, by_set in report["stages"].items():
        print(f"{stage:45s}", "  ".join(f"{s} {by_set[s]['wer'] * 100:5.1f}%" for s in SETS if s in by_set))


if __name__ == "__main__":
    main()
