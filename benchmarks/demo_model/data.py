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


def synthesize(work: Path, n_asr_heldout: int, n_aac_train: int, n_aac_heldout: int, seed: int) -> dict:
    """Write every clip under work/audio and the split lists (work/clips.json); skips existing clips."""
    rng = np.random.default_rng(seed)
    sentences = speech_sentences(fortune_cookies())
    order = rng.permutation(len(sentences))
    heldout = {sentences[i] for i in order[:n_asr_heldout]}
    clips = []
    for i in order:
        s = sentences[i]
        split = "heldout" if s in heldout else "train"
        voices, variants = (HELDOUT_VOICES, HELDOUT_VARIANTS) if split == "heldout" else (TRAIN_VOICES, TRAIN_VARIANTS)
        voice = str(rng.choice(voices)) + str(rng.choice(variants))
        clips.append({"task": "asr", "split": split, "text": s, "voice": voice,
                      "speed": int(rng.integers(130, 181)), "pitch": int(rng.integers(35, 66))})
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
    (work / "clips.json").write_text(json.dumps(clips, indent=0))
    return {"clips": len(clips), "sentences": len(sentences)}


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
    mode = "r+" if (work / "whisper.f16").exists() else "w+"
    whisper_out = np.memmap(work / "whisper.f16", dtype=np.float16, mode=mode, shape=(n, 1500, width))
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
