"""`salmonn-export demo-data`: a small ASR + AAC test set synthesized locally, in challenge format.

ASR: sentences spoken by flite with several voices and speeds, saved at 16 kHz and other
rates, mono and stereo. AAC: generated sound scenes (tones, chirps, noise bursts, rhythms), each
with a caption. One annotation JSON holds both tasks, with references.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from salmonn_export.audio import resample
from salmonn_export.files import atomic_dir
from salmonn_export.model.synth import scene_event, speak

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "please call stella and ask her to bring these things",
    "she sells sea shells by the sea shore",
    "the weather today is sunny with a light breeze",
    "we will meet at nine in the morning",
    "a dog barked twice and then the street was quiet",
    "turn left at the second traffic light",
    "my favourite colour is blue",
    "he read twenty one pages before dinner",
    "the train to london leaves from platform four",
]
# flite voices (Debian main): rms is held out of the demo's training, the others are trained on
VOICES = [("flite:rms", 160), ("flite:slt", 140), ("flite:awb", 185), ("flite:kal16", 170), ("flite:rms", 150)]
RATES = [16000, 22050, 16000, 44100, 8000]


SCENES = ["tone", "chirp_up", "chirp_down", "noise_bursts", "beeps", "hum_noise"]


def write_demo_data(out_dir: str | Path, seed: int = 0, force: bool = False) -> dict:
    out = Path(out_dir).expanduser().resolve()
    rng = np.random.default_rng(seed)
    items = []
    with atomic_dir(out, force) as tmp:
        (tmp / "asr").mkdir()
        (tmp / "aac").mkdir()
        for i, sentence in enumerate(SENTENCES):
            voice, speed = VOICES[i % len(VOICES)]
            rate = RATES[i % len(RATES)]
            path = tmp / "asr" / f"speech_{i:02d}.wav"
            speak(sentence, path, voice=voice, speed=speed)
            if rate != 16000 or i % 3 == 2:
                wave, sr = sf.read(path, dtype="float64")
                wave = resample(wave, sr, rate) if rate != sr else wave
                if i % 3 == 2:
                    wave = np.stack([wave, 0.5 * wave[::-1]], axis=1)  # stereo: channel 0 is the speech
                sf.write(path, wave, rate, subtype="PCM_16")
            items.append({"testset_id": f"test{len(items):04d}", "path": f"asr/{path.name}", "task": "asr",
                          "text": sentence.capitalize() + "."})
        for i, kind in enumerate(SCENES * 2):
            wave, phrase = scene_event(kind, float(rng.uniform(2.0, 6.0)), 16000, rng)
            caption = phrase.capitalize()
            path = tmp / "aac" / f"scene_{i:02d}.wav"
            sf.write(path, wave, 16000, subtype="PCM_16")
            items.append({"testset_id": f"test{len(items):04d}", "path": f"aac/{path.name}", "task": "audiocaption_v2",
                          "text": caption})
        (tmp / "annotation.json").write_text(json.dumps({"annotation": items}, indent=1))
    return {"folder": str(out), "annotation": str(out / "annotation.json"),
            "asr": sum(i["task"] == "asr" for i in items), "aac": sum(i["task"] != "asr" for i in items)}
