"""Training data for the demo SALMONN: text corpus, synthesized clips, frozen-encoder features.

Everything is local and seeded: English text from Debian's `fortunes` package, speech from
espeak-ng (training and held-out voices are disjoint), captioned sound scenes from
`salmonn_export.model.synth`. Encoder outputs are computed once and stored as fp16 memmaps,
because the encoders are frozen (as in SALMONN training) and Whisper dominates the cost.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from salmonn_export.audio import load_audio
from salmonn_export.harness.demo_data import SENTENCES as DEMO_TEST_SENTENCES
from salmonn_export.model.beats import load_beats
from salmonn_export.model.synth import captioned_scene, speak
from salmonn_export.model.whisper import load_feature_extractor, whisper_features

FORTUNES = Path("/usr/share/games/fortunes")
TRAIN_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-us-nyc", "en-gb-x-gbcwmd"]
TRAIN_VARIANTS = ["", "+m1", "+m2", "+m3", "+m5", "+f1", "+f2", "+f3", "+klatt"]
HELDOUT_VOICES = ["en-gb-scotland", "en-029"]
HELDOUT_VARIANTS = ["", "+m4", "+f4"]


def fortune_cookies() -> list[str]:
    """Every cookie of the installed English fortune files (apt-get install fortunes)."""
    files = sorted(p for p in FORTUNES.glob("*") if p.is_file() and "." not in p.name)
    if not files:
        raise SystemExit(f"no fortune files in {FORTUNES}: apt-get install fortunes")
    cookies = []
    for path in files:
        for cookie in path.read_text(encoding="latin-1").split("\n%\n"):
            cookie = re.sub(r"\s+", " ", cookie).strip()
            if cookie and not re.search(r"[|_\\/<>{}#@]{2,}", cookie):  # skip ascii art
                cookies.append(cookie)
    return cookies


def normalise(sentence: str) -> str:
    """Lowercase words and apostrophes only: what the ASR target looks like."""
    words = re.sub(r"[^a-z' ]", " ", sentence.lower())
    return re.sub(r"\s+", " ", words).strip(" '")


def speech_sentences(cookies: list[str], vocab_size: int = 2000) -> list[str]:
    """Plain 5-12 word sentences whose words are all among the `vocab_size` most frequent ones."""
    candidates = []
    for cookie in cookies:
        for s in re.split(r"(?<=[.!?])\s+", cookie):
            s = s.strip()
            if re.fullmatch(r"[A-Za-z][A-Za-z ,']*[.!?]?", s) and 5 <= len(s.split()) <= 12:
                candidates.append(normalise(s))
    counts = collections.Counter(w for s in candidates for w in s.split())
    common = {w for w, _ in counts.most_common(vocab_size)}
    demo = {normalise(s) for s in DEMO_TEST_SENTENCES}
    return sorted({s for s in candidates if all(w in common for w in s.split()) and s not in demo})


def _speaker(rng: np.random.Generator, voices: list[str], variants: list[str]) -> dict:
    """A random espeak-ng speaker: voice + variant, speed (words per minute) and pitch."""
    voice = str(rng.choice(voices)) + str(rng.choice(variants))
    return {"voice": voice, "speed": int(rng.integers(130, 181)), "pitch": int(rng.integers(35, 66))}


def synthesize(work: Path, n_asr_heldout: int, n_aac_train: int, n_aac_heldout: int, n_packed: int,
               seed: int) -> dict:
    """Write every clip under work/audio and the split lists (work/clips.json); skips existing clips.

    Clip order: single sentences (train and held-out), scenes (train, held-out), then `n_packed`
    training clips of several utterances each (`packed_clips`). The packed clips come last and
    from their own random stream, so the first clips do not depend on `n_packed`."""
    rng = np.random.default_rng(seed)
    sentences = speech_sentences(fortune_cookies())
    order = rng.permutation(len(sentences))
    heldout = {sentences[i] for i in order[:n_asr_heldout]}
    clips = []
    for i in order:
        s = sentences[i]
        split = "heldout" if s in heldout else "train"
        voices, variants = (HELDOUT_VOICES, HELDOUT_VARIANTS) if split == "heldout" else (TRAIN_VOICES, TRAIN_VARIANTS)
        clips.append({"task": "asr", "split": split, "text": s, **_speaker(rng, voices, variants)})
    for split, n in (("train", n_aac_train), ("heldout", n_aac_heldout)):
        for _ in range(n):
            clips.append({"task": "audiocaption_v2", "split": split, "scene_seed": int(rng.integers(2**31))})
    audio = work / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(tqdm(clips, desc="synthesize", mininterval=5)):
        clip["path"] = f"audio/{i:05d}.wav"
        path = work / clip["path"]
        if clip["task"] == "asr":
            if not path.exists():
                speak(clip["text"], path.with_suffix(".tmp.wav"), voice=clip["voice"], speed=clip["speed"],
                      pitch=clip["pitch"]).rename(path)
        else:
            wave, caption = captioned_scene(np.random.default_rng(clip["scene_seed"]))
            clip["text"] = caption
            if not path.exists():
                sf.write(str(path.with_suffix(".tmp.wav")), wave, 16000, subtype="PCM_16")
                path.with_suffix(".tmp.wav").rename(path)
    train_sentences = sorted(s for s in sentences if s not in heldout)
    clips += packed_clips(work, train_sentences, n_packed, len(clips), seed)
    (work / "clips.json").write_text(json.dumps(clips, indent=0))
    return {"clips": len(clips), "sentences": len(sentences), "packed_clips": n_packed,
            "packed_utterances": sum(len(c["segments"]) for c in clips if "segments" in c),
            "packed_words": sum(len(c["text"].split()) for c in clips if "segments" in c)}


PACKED_SECONDS = 29.0  # under Whisper's 30 s window, so nothing is cut
SALAD_FRACTION = 0.25


def packed_clips(work: Path, sentences: list[str], n: int, first_index: int, seed: int) -> list[dict]:
    """Training clips that fill Whisper's 30-s window with several utterances in a row.

    Whisper pads every clip to 30 s, so its cost is per clip, not per second of speech: a clip of
    one 3-s sentence spends 90 % of it on silence. Packing up to 12 utterances (as many as fit;
    each its own voice, speed and pitch, 0.2-0.6 s apart) gives ~7x the words per encoder pass,
    and a language prior cannot guess where the next utterance goes. A quarter of the
    utterances are "word salad" (3-8 random words of the training vocabulary): no language prior
    predicts them, so the model can only get them right by reading the speech tokens. The
    target is the utterances' words joined by spaces.

    Each clip's plan is saved beside its audio (`NNNNN.json`), so a resumed run re-reads it
    instead of re-synthesizing."""
    rng = np.random.default_rng(seed + 1000)
    vocab = sorted({w for s in sentences for w in s.split()})
    audio = work / "audio"
    clips = []
    for k in tqdm(range(n), desc="packed clips", mininterval=5):
        path = audio / f"{first_index + k:05d}.wav"
        plan_path = path.with_suffix(".json")
        # every draw happens whether or not the clip exists, so the stream is the same on resume
        wanted = int(rng.integers(2, 13))
        segments = []
        for _ in range(wanted):
            if rng.random() < SALAD_FRACTION:
                text = " ".join(rng.choice(vocab, size=int(rng.integers(3, 9))))
            else:
                text = str(sentences[int(rng.integers(len(sentences)))])
            segments.append({"text": text, **_speaker(rng, TRAIN_VOICES, TRAIN_VARIANTS),
                             "gap": round(float(rng.uniform(0.2, 0.6)), 2)})
        if not (path.exists() and plan_path.exists()):
            _write_packed(path, segments)
        kept = json.loads(plan_path.read_text())
        clips.append({"task": "asr", "split": "train", "text": " ".join(s["text"] for s in kept),
                      "segments": kept, "path": f"audio/{path.name}"})
    return clips


def _write_packed(path: Path, segments: list[dict], sample_rate: int = 16000) -> None:
    """Speak the segments in order, keeping those that fit in PACKED_SECONDS (at least one)."""
    pieces, kept = [], []
    tmp = path.with_suffix(".seg.wav")
    for seg in segments:
        speak(seg["text"], tmp, voice=seg["voice"], speed=seg["speed"], pitch=seg["pitch"], sample_rate=sample_rate)
        wave, _ = sf.read(str(tmp), dtype="float64")
        gap = np.zeros(int(seg["gap"] * sample_rate))
        if kept and sum(map(len, pieces)) + len(gap) + len(wave) > PACKED_SECONDS * sample_rate:
            break
        pieces += [gap, wave] if kept else [wave]
        kept.append(seg)
    tmp.unlink()
    wave = np.concatenate(pieces)[: int(PACKED_SECONDS * sample_rate)]
    sf.write(str(path.with_suffix(".tmp.wav")), wave, sample_rate, subtype="PCM_16")
    path.with_suffix(".tmp.json").write_text(json.dumps(kept))
    path.with_suffix(".tmp.wav").rename(path)
    path.with_suffix(".tmp.json").rename(path.with_suffix(".json"))


def encoder_features(work: Path, whisper_dir: Path, beats_path: Path, batch_size: int = 8) -> None:
    """Frozen Whisper (sdpa attention: equal to eager up to rounding) and BEATs outputs, fp16 memmaps.

    Resumable: a `done` count is saved after every batch.
    """
    from transformers import WhisperModel

    clips = json.loads((work / "clips.json").read_text())
    extractor = load_feature_extractor(whisper_dir)
    whisper = WhisperModel.from_pretrained(str(whisper_dir), attn_implementation="sdpa").encoder.eval()
    beats = load_beats(beats_path).eval()
    width = whisper.config.d_model
    n = len(clips)
    store = work / "whisper.f16"
    size = n * 1500 * width * 2
    if store.exists() and store.stat().st_size < size:  # clips were added (e.g. packed ones): grow, keep the rest
        with open(store, "r+b") as f:
            f.truncate(size)
    mode = "r+" if store.exists() else "w+"
    whisper_out = np.memmap(store, dtype=np.float16, mode=mode, shape=(n, 1500, width))
    progress_file = work / "features_done.json"
    done = json.loads(progress_file.read_text())["done"] if progress_file.exists() else 0
    beats_dir = work / "beats"
    beats_dir.mkdir(exist_ok=True)
    with torch.inference_mode():
        for start in tqdm(range(done, n, batch_size), desc="encoder features", mininterval=10):
            waves = [load_audio(work / c["path"]) for c in clips[start:start + batch_size]]
            mels = torch.stack([whisper_features(extractor, w) for w in waves])
            whisper_out[start:start + len(waves)] = whisper(mels).last_hidden_state.numpy().astype(np.float16)
            for j, w in enumerate(waves):
                raw = torch.from_numpy(w).unsqueeze(0)
                feats = beats.extract_features(raw, torch.zeros_like(raw, dtype=torch.bool))[0]
                np.save(beats_dir / f"{start + j:05d}.npy", feats.numpy().astype(np.float16))
            whisper_out.flush()
            progress_file.write_text(json.dumps({"done": start + len(waves)}))
