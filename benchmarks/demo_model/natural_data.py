"""Training data from natural offline voices (issue 17): a larger English text corpus, packed
30-s windows, speed/pitch variety, and two held-out ASR sets.

Text: every fortune cookie sentence (Debian `fortunes`) and every quoted usage example of WordNet's
glosses (Debian `wordnet-base`), normalised to lowercase words and apostrophes, 4-16 words, every
word in the system word list (Debian `wamerican`, so the voices pronounce known words): ~40 k
distinct word sequences (the shipped demo used 2,360).

Splits (disjoint by construction):
- `heldout_sentences`: sentences no stage sees, spoken by training voices;
- `heldout_voices`: other unseen sentences, spoken by voices no training clip uses
  (`voices.HELDOUT_VOICES`);
- `train`: packed clips (as many utterances as fit in 29 s, each its own voice, tempo and pitch,
  0.15-0.5 s apart, `WORD_SALAD` of them random words that no language prior predicts) and single
  sentences (so the model also sees mostly-silent windows, as in a user's short clip);
- captioned sound scenes (`train` / `heldout`), as in the shipped demo.

Every clip's plan (utterances kept) is saved beside its audio, so a resumed run re-reads it.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import voices
from tqdm import tqdm
from voices import Utterance

FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
WORD_LIST = Path("/usr/share/dict/words")
APT_PACKAGES = ["fortunes", "wordnet-base", "wamerican"]
MIN_WORDS, MAX_WORDS = 4, 16
PACKED_SECONDS = 29.0  # under Whisper's 30-s window, so nothing is cut
WORD_SALAD = 0.15
TEMPO = (0.85, 1.25)
PITCH_CENTS = (-250, 250)
CHUNK = 24  # clips rendered together: festival's ~0.5-s start-up once per voice per chunk
_PLAIN = re.compile(r"[A-Za-z][A-Za-z ,;:'-]*[.!?]?")


def normalise(sentence: str) -> str:
    """Lowercase words and apostrophes only: what the ASR target looks like."""
    words = re.sub(r"[^a-z' ]", " ", sentence.lower().replace("-", " "))
    return re.sub(r"\s+", " ", words).strip(" '")


def wordnet_examples(gloss_lines: list[str]) -> list[str]:
    """The double-quoted usage examples of WordNet `data.*` lines (after the `|` gloss mark)."""
    out = []
    for line in gloss_lines:
        if line.startswith("  ") or "|" not in line:  # licence header lines start with two spaces
            continue
        out += re.findall(r'"([^"]+)"', line.split("|", 1)[1])
    return out


def fortune_sentences(cookies: list[str]) -> list[str]:
    """Sentences of fortune cookies (split after . ! ?)."""
    return [s.strip() for cookie in cookies for s in re.split(r"(?<=[.!?])\s+", cookie)]


def filter_sentences(raw: list[str], known_words: set[str]) -> list[str]:
    """Plain sentences (letters, spaces, light punctuation only), MIN..MAX words, every word known;
    normalised, unique, sorted (so the result does not depend on file order)."""
    out = set()
    for s in raw:
        s = s.strip()
        if not _PLAIN.fullmatch(s):
            continue
        n = normalise(s)
        words = n.split()
        if MIN_WORDS <= len(words) <= MAX_WORDS and all(w in known_words or w.replace("'", "") in known_words
                                                         for w in words):
            out.add(n)
    return sorted(out)


def corpus() -> tuple[list[str], list[str]]:
    """The installed corpus, filtered: (all sentences, the WordNet examples that are no fortune
    sentence). Held-out sentences come from the second list only, so no language model pre-trained
    on fortunes (the shipped demo LLM) has seen them. Raises SystemExit naming a missing Debian package."""
    import data

    for path, package in ((FORTUNES, "fortunes"), (WORDNET, "wordnet-base"), (WORD_LIST, "wamerican")):
        if not path.exists():
            raise SystemExit(f"{path} is missing: apt-get install {package}")
    known = {w.strip().lower() for w in WORD_LIST.read_text(encoding="utf-8", errors="ignore").splitlines()}
    fortunes = filter_sentences(fortune_sentences(data.fortune_cookies()), known)
    examples = []
    for f in sorted(WORDNET.glob("data.*")):
        examples += wordnet_examples(f.read_text(encoding="latin-1").splitlines())
    wordnet = filter_sentences(examples, known)
    return sorted(set(fortunes) | set(wordnet)), sorted(set(wordnet) - set(fortunes))


def split_sentences(sentences: list[str], n_heldout_sentences: int, n_heldout_voices: int,
                    exclude: set[str], seed: int, heldout_pool: list[str] | None = None) -> dict[str, list[str]]:
    """Disjoint `heldout_sentences`, `heldout_voices` and `train` lists (seeded permutation of
    `heldout_pool`, default all sentences, for the held-out ones); `exclude` (e.g. the demo test
    set's sentences) goes to no list."""
    pool = [s for s in (heldout_pool if heldout_pool is not None else sentences) if s not in exclude]
    order = np.random.default_rng(seed).permutation(len(pool))
    picked = [pool[i] for i in order]
    a, b = n_heldout_sentences, n_heldout_sentences + n_heldout_voices
    heldout = set(picked[:b])
    train = sorted(s for s in sentences if s not in heldout and s not in exclude)
    return {"heldout_sentences": picked[:a], "heldout_voices": picked[a:b], "train": train}


def utterance(rng: np.random.Generator, text: str, voice_list: list[str]) -> Utterance:
    return Utterance(text=text, voice=str(rng.choice(voice_list)), tempo=round(float(rng.uniform(*TEMPO)), 3),
                     pitch=int(rng.integers(PITCH_CENTS[0], PITCH_CENTS[1] + 1)))


def plan_packed(rng: np.random.Generator, train: list[str], vocab: list[str], words_per_second: float = 2.6
                ) -> list[dict]:
    """Utterances for one packed clip: drawn until their estimated length reaches the window
    (the clip keeps those that really fit, see `fit_pieces`)."""
    plan, seconds = [], 0.0
    while seconds < PACKED_SECONDS * 1.1:
        if rng.random() < WORD_SALAD:
            text = " ".join(rng.choice(vocab, size=int(rng.integers(3, 9))))
        else:
            text = str(train[int(rng.integers(len(train)))])
        u = utterance(rng, text, voices.TRAIN_VOICES)
        gap = round(float(rng.uniform(0.15, 0.5)), 2)
        plan.append({**u.__dict__, "gap": gap})
        seconds += len(text.split()) / words_per_second / u.tempo + gap
    return plan


def fit_pieces(lengths: list[int], gaps: list[int], limit: int) -> int:
    """How many leading pieces fit in `limit` samples (at least one): piece k adds its gap before
    it (except the first) and its length."""
    total, kept = 0, 0
    for k, (n, gap) in enumerate(zip(lengths, gaps)):
        add = n + (gap if k else 0)
        if k and total + add > limit:
            break
        total += add
        kept += 1
    return kept


def _pieces(path: Path, plan: list[dict]) -> list[tuple[Utterance, Path]]:
    keys = ("text", "voice", "tempo", "pitch")
    folder = path.with_suffix(".pieces")
    return [(Utterance(**{k: seg[k] for k in keys}), folder / f"{k:02d}.wav") for k, seg in enumerate(plan)]


def write_clips(items: list[tuple[Path, list[dict]]]) -> None:
    """Render the utterances of several clips in one go (festival starts once per voice), then
    assemble each clip (`assemble_clip`)."""
    jobs = []
    for path, plan in items:
        path.with_suffix(".pieces").mkdir(exist_ok=True)
        jobs += _pieces(path, plan)
    voices.render(jobs)
    for path, plan in items:
        assemble_clip(path, plan)


def assemble_clip(path: Path, plan: list[dict]) -> None:
    """From the rendered utterances, keep those that fit in PACKED_SECONDS; write the WAV and the
    kept plan (`.json` beside it; temp names, then renames); remove the pieces."""
    jobs = _pieces(path, plan)
    pieces_dir = path.with_suffix(".pieces")
    waves = [sf.read(str(p), dtype="float64")[0] for _, p in jobs]
    gaps = [int(seg.get("gap", 0.0) * voices.SAMPLE_RATE) for seg in plan]
    kept = fit_pieces([len(w) for w in waves], gaps, int(PACKED_SECONDS * voices.SAMPLE_RATE))
    parts = []
    for k in range(kept):
        if k:
            parts.append(np.zeros(gaps[k]))
        parts.append(waves[k])
    wave = np.concatenate(parts)[: int(PACKED_SECONDS * voices.SAMPLE_RATE)]
    sf.write(str(path.with_suffix(".tmp.wav")), wave, voices.SAMPLE_RATE, subtype="PCM_16")
    path.with_suffix(".tmp.json").write_text(json.dumps(plan[:kept]))
    path.with_suffix(".tmp.wav").rename(path)
    path.with_suffix(".tmp.json").rename(path.with_suffix(".json"))
    for _, p in jobs:
        p.unlink()
    pieces_dir.rmdir()


def _write_missing(chunk: list[tuple[str, list[dict]]]) -> None:
    write_clips([(Path(p), plan) for p, plan in chunk
                 if not (Path(p).exists() and Path(p).with_suffix(".json").exists())])


def synthesize(work: Path, n_packed: int, n_single: int, n_heldout_sentences: int, n_heldout_voices: int,
               n_aac_train: int, n_aac_heldout: int, seed: int, workers: int = 2) -> dict:
    """Plan every clip (seeded: the plan does not depend on what exists), render the missing ones
    with `workers` processes, write work/clips.json. Returns counts for the log."""
    from salmonn_export.harness.demo_data import SENTENCES as DEMO_TEST_SENTENCES
    from salmonn_export.model.synth import captioned_scene

    sentences, heldout_pool = corpus()
    split = split_sentences(sentences, n_heldout_sentences, n_heldout_voices,
                            {normalise(s) for s in DEMO_TEST_SENTENCES}, seed, heldout_pool)
    train = split["train"]
    vocab = sorted({w for s in train for w in s.split()})
    rng = np.random.default_rng(seed + 1)
    plans: list[tuple[str, str, list[dict]]] = []  # (task split, kind, plan)
    for s in split["heldout_sentences"]:
        plans.append(("heldout_sentences", "single", [utterance(rng, s, voices.TRAIN_VOICES).__dict__]))
    for s in split["heldout_voices"]:
        plans.append(("heldout_voices", "single", [utterance(rng, s, voices.HELDOUT_VOICES).__dict__]))
    for _ in range(n_single):
        plans.append(("train", "single", [utterance(rng, str(train[int(rng.integers(len(train)))]),
                                                    voices.TRAIN_VOICES).__dict__]))
    for _ in range(n_packed):
        plans.append(("train", "packed", plan_packed(rng, train, vocab)))
    audio = work / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    items = [(str(audio / f"{i:05d}.wav"), plan) for i, (_, _, plan) in enumerate(plans)]
    chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(_write_missing, chunks), total=len(chunks), desc="speak", mininterval=30):
            pass
    clips = []
    for i, (clip_split, kind, _) in enumerate(plans):
        kept = json.loads((audio / f"{i:05d}.json").read_text())
        clip = {"task": "asr", "split": clip_split, "text": " ".join(seg["text"] for seg in kept),
                "path": f"audio/{i:05d}.wav", "voice": kept[0]["voice"]}
        if kind == "packed":
            clip["segments"] = kept
        clips.append(clip)
    scene_rng = np.random.default_rng(seed + 2)
    for scene_split, n in (("train", n_aac_train), ("heldout", n_aac_heldout)):
        for _ in range(n):
            i = len(clips)
            scene_seed = int(scene_rng.integers(2**31))
            wave, caption = captioned_scene(np.random.default_rng(scene_seed))
            path = audio / f"{i:05d}.wav"
            if not path.exists():
                sf.write(str(path.with_suffix(".tmp.wav")), wave, 16000, subtype="PCM_16")
                path.with_suffix(".tmp.wav").rename(path)
            clips.append({"task": "audiocaption_v2", "split": scene_split, "text": caption,
                          "path": f"audio/{i:05d}.wav", "scene_seed": scene_seed})
    (work / "clips.json.tmp").write_text(json.dumps(clips, indent=0))
    (work / "clips.json.tmp").rename(work / "clips.json")
    (work / "sentences.json").write_text(json.dumps(split))
    packed = [c for c in clips if "segments" in c]
    return {"corpus_sentences": len(sentences), "train_sentences": len(train), "clips": len(clips),
            "packed_clips": len(packed), "packed_utterances": sum(len(c["segments"]) for c in packed),
            "train_words": sum(len(c["text"].split()) for c in clips if c["split"] == "train" and c["task"] == "asr"),
            "distinct_train_utterances": len({seg["text"] for c in packed for seg in c["segments"]}
                                             | {c["text"] for c in clips if c["split"] == "train"
                                                and c["task"] == "asr" and "segments" not in c})}
