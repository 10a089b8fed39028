"""Stage 3: a tokenizer and a small Llama pre-trained on English text (the fortunes corpus).

The tokenizer is byte-level BPE with the Llama-3 special tokens appended (same construction as
the `tiny` preset). Sentences held out for ASR scoring are removed from the corpus, so the
held-out WER is on text no stage has seen. A quarter of the sequences are prompt-shaped copy
exercises ("USER: <Speech>…</Speech> Recognize…\\nASSISTANT: …"), a stand-in for the
instruction tuning a real chat LLM has before SALMONN training.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import data
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from salmonn_export.model.prompts import builtin_test_prompts
from salmonn_export.model.tiny import LLAMA3_SPECIALS

BPE_VOCAB = 4000
LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
SEQ_LEN, BATCH = 128, 16
END = "<|end_of_text|>"


def corpus(work: Path) -> tuple[list[str], list[str]]:
    """Lowercased fortune cookies without held-out sentences, and the speakable sentences for copy drills.

    With natural-voice data (natural_data.py wrote work/sentences.json): its training sentences
    (fortunes + WordNet examples; held-out ones were split off before) for both."""
    clips = json.loads((work / "clips.json").read_text())
    captions = sorted({c["text"].lower() for c in clips if c["task"] != "asr" and c["split"] == "train"})
    if (work / "sentences.json").exists():
        train = json.loads((work / "sentences.json").read_text())["train"]
        return train + captions, train
    heldout = {c["text"] for c in clips if c["task"] == "asr" and c["split"] == "heldout"}
    cookies = data.fortune_cookies()
    kept = []
    for cookie in cookies:
        words = data.normalise(cookie)
        if not any(h in words for h in heldout):
            kept.append(cookie.lower())
    sentences = [s for s in data.speech_sentences(cookies) if s not in heldout]
    return kept + captions, sentences


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    prompts = list(builtin_test_prompts().values()) + ["USER: {}\nASSISTANT:"]
    tok.train_from_iterator(texts + prompts * 50, trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token=END,
                                   clean_up_tokenization_spaces=False)


def copy_drill(sentence: str, asr_prompt: str) -> str:
    before, after = asr_prompt.split("<SpeechHere>")
    return f"USER: {before}{sentence}{after}\nASSISTANT:{sentence}{END}"


def _batches(stream: torch.Tensor, drills: list, drill_fraction: float, bos: int, eos: int,
             answer_only: bool = False):
    """A batch of corpus windows and copy drills; with `answer_only`, a drill's loss is on its
    answer only (a drill is `(ids, answer_start)` then)."""
    rows, masks, label_rows = [], [], []
    for _ in range(BATCH):
        first_label = 0
        if random.random() < drill_fraction:
            drill = random.choice(drills)
            if answer_only:
                drill, first_label = drill[0], drill[1] + 1
            ids = [bos] + drill
        else:
            start = random.randrange(0, len(stream) - SEQ_LEN)
            ids = [bos] + stream[start:start + SEQ_LEN - 1].tolist()
        pad = SEQ_LEN - len(ids)
        masks.append([1] * len(ids) + [0] * pad)
        rows.append(ids + [eos] * pad)
        label_rows.append([-100] * first_label + ids[first_label:] + [-100] * pad)
    return torch.tensor(rows), torch.tensor(masks), torch.tensor(label_rows)


def _optimize(model, steps: int, lr: float, batch_fn, desc: str, constant: bool = False) -> list[float]:
    """AdamW with a 5 % linear warm-up, then cosine to 0.1·lr (or `constant`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        if constant:
            return 1.0
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=desc, mininterval=10):
        ids, mask, labels = batch_fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision, as the challenge trains (amp)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"{desc} step {step} loss {sum(losses[-100:]) / len(losses[-100:]):.3f}", flush=True)
    model.eval()
    return losses


def _data(texts: list[str], sentences: list[str], tok, with_shuffled: bool) -> tuple[torch.Tensor, list[list[int]]]:
    """The token stream of the corpus, and copy drills: real sentences, plus word-shuffled ones
    when asked (so that copying, not the language prior, is what solves them)."""
    stream: list[int] = []
    for text in texts:
        stream += tok(text + END, add_special_tokens=False).input_ids
    rng = random.Random(0)
    shuffled = []
    for s in sentences:
        words = s.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    asr_prompt = builtin_test_prompts()["asr"]
    drills = [tok(copy_drill(s, asr_prompt), add_special_tokens=False).input_ids[: SEQ_LEN - 1]
              for s in sentences + (shuffled if with_shuffled else [])]
    return torch.tensor(stream), drills


def train_lm(work: Path, steps: int, seed: int) -> dict:
    """Phase 1: language modelling (a quarter of the sequences are copy drills)."""
    random.seed(seed)
    torch.manual_seed(seed)
    texts, sentences = corpus(work)
    tok = train_tokenizer(texts)
    stream, drills = _data(texts, sentences, tok, with_shuffled=False)
    bos, eos = tok.convert_tokens_to_ids("<|begin_of_text|>"), tok.convert_tokens_to_ids(END)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, initializer_range=0.02,
                         **LLAMA)
    model = LlamaForCausalLM(config)
    losses = _optimize(model, steps, 3e-3, lambda: _batches(stream, drills, 0.25, bos, eos), "lm pretrain")
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=[eos] + tok.convert_tokens_to_ids(["<|eom_id|>", "<|eot_id|>"]))
    for folder in ("llm", "llm_pretrained"):  # llm_pretrained: where a rerun of the drills starts
        model.save_pretrained(str(work / folder))
        tok.save_pretrained(str(work / folder))
    return {"params": sum(p.numel() for p in model.parameters()), "tokens_in_corpus": len(stream),
            "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 3), "steps": steps,
            "tokens_seen": steps * BATCH * SEQ_LEN}


def train_drills(work: Path, steps: int, seed: int, induction_steps: int = 0, min_copy: float = 0.0) -> dict:
    """Phase 2: copy drills, so the LM learns to read words out of its prompt, the skill SALMONN's
    frozen LLM needs to read out the speech tokens.

    0) with `induction_steps`: random-token copies only, answer-only loss, constant lr 1e-3;
    a) 800 steps, 60 % drills (real and word-shuffled sentences), loss on whole sequences;
    b) `steps` steps, 85 % drills, loss on the answers only, a third of them random-token
       sequences, the rest real and shuffled sentences.
    Measured on the natural-voice corpus: (a)+(b) alone ended at answer loss 3.37 and held-out copy
    exact-match 0.05 (run 1); with (0) first — whose own answer loss only falls 10.6 → 7.45 in 400
    steps from the pre-trained LM — (a)+(b) end at 2.75 and copy exact-match 0.60 (run 2).

    Starts from the pre-trained LM (`llm_pretrained`, else `llm`). Raises RuntimeError, leaving
    `llm` as it was (the drilled model kept in `llm_drills_failed` to inspect), when held-out copy
    exact-match ends below `min_copy`.
    """
    source = work / "llm_pretrained" if (work / "llm_pretrained").is_dir() else work / "llm"
    tok = PreTrainedTokenizerFast.from_pretrained(str(source))
    model = LlamaForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    bos, eos = model.config.bos_token_id, model.config.eos_token_id
    random.seed(seed + 1)
    torch.manual_seed(seed + 1)
    stream, drills = _data(*corpus(work), tok, with_shuffled=True)
    info = {}
    if induction_steps:
        copies = _random_drills(tok, len(drills), seed + 3)
        losses_0 = _optimize(model, induction_steps, 1e-3,
                             lambda: _batches(stream, copies, 1.0, bos, eos, answer_only=True),
                             "lm drills induction", constant=True)
        info = {"final_answer_loss_induction": round(sum(losses_0[-50:]) / len(losses_0[-50:]), 3),
                **{f"after_induction_{k}": v for k, v in copy_accuracy(model, tok, work).items()}}
    losses_a = _optimize(model, 800, 1e-3, lambda: _batches(stream, drills, 0.6, bos, eos), "lm drills a")
    losses_b = drills_b(model, tok, stream, drills, steps, seed)
    copied = copy_accuracy(model, tok, work)
    info = {"steps": induction_steps + 800 + steps, **info, "final_loss_a": round(sum(losses_a[-100:]) / 100, 3),
            "final_answer_loss_b": round(sum(losses_b[-100:]) / 100, 3), **copied}
    if copied["heldout_copy_exact"] < min_copy:
        model.save_pretrained(str(work / "llm_drills_failed"))
        tok.save_pretrained(str(work / "llm_drills_failed"))
        raise RuntimeError(f"copy drills failed: held-out copy exact-match {copied['heldout_copy_exact']} < {min_copy} "
                           f"({info}); the LLM cannot read words out of its prompt, so the reader would not learn")
    model.save_pretrained(str(work / "llm.tmp"))
    tok.save_pretrained(str(work / "llm.tmp"))
    import shutil

    shutil.rmtree(work / "llm")
    (work / "llm.tmp").rename(work / "llm")
    return info


def _random_drills(tok, n: int, seed: int) -> list[tuple[list[int], int]]:
    """`n` random-token copies through the ASR prompt: (ids, answer start), 4-20 BPE ids each."""
    asr_prompt = builtin_test_prompts()["asr"]
    before, after = asr_prompt.split("<SpeechHere>")
    head = tok(f"USER: {before}", add_special_tokens=False).input_ids
    tail = tok(f"{after}\nASSISTANT:", add_special_tokens=False).input_ids
    end = tok.convert_tokens_to_ids(END)
    rng = random.Random(seed)
    drills = []
    for _ in range(n):
        body = [rng.randrange(300, BPE_VOCAB - 300) for _ in range(rng.randint(4, 20))]
        drills.append((head + body + tail + body + [end], len(head) + len(body) + len(tail)))
    return drills


def drills_b(model, tok, stream: torch.Tensor, sentence_drills: list[list[int]], steps: int, seed: int) -> list[float]:
    random.seed(seed + 2)
    torch.manual_seed(seed + 2)
    end = tok.convert_tokens_to_ids(END)
    drills = []
    for ids in sentence_drills:
        prompt = tok.decode(ids).rsplit("ASSISTANT:", 1)[0] + "ASSISTANT:"
        drills.append((ids, len(tok(prompt, add_special_tokens=False).input_ids)))
    drills += _random_drills(tok, len(sentence_drills) // 2, seed)
    return _optimize(model, steps, 2e-3, lambda: _batches(stream, drills, 0.85, model.config.bos_token_id, end,
                                                          answer_only=True), "lm drills b")


@torch.no_grad()
def copy_accuracy(model, tok, work: Path, n: int = 20) -> dict:
    """Greedy copy of held-out sentences through the ASR prompt: exact-copy rate."""
    clips = json.loads((work / "clips.json").read_text())
    heldout = [c["text"] for c in clips if c["task"] == "asr" and c["split"].startswith("heldout")][:n]
    asr_prompt = builtin_test_prompts()["asr"]
    hits = 0
    for s in heldout:
        prompt = copy_drill(s, asr_prompt).rsplit("ASSISTANT:", 1)[0] + "ASSISTANT:"
        ids = tok("<|begin_of_text|>" + prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=tok.eos_token_id)
        hits += tok.decode(out[0, ids.shape[1]:]).split(END)[0] == s
    return {"heldout_copy_exact": hits / len(heldout)}
