"""The embedded default model: what every command uses when no `--model` is given.

Built on first use under the user's cache folder (`SALMONN_EXPORT_CACHE` overrides it) and rebuilt
when missing or stale (the stamp records the tool version and recipe of the build). Demo clips are
synthesized locally beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import soundfile as sf
from platformdirs import user_cache_dir

from salmonn_export import __version__
from salmonn_export.model.synth import sound_scene, speak
from salmonn_export.model.tiny import write_tiny_salmonn

DEMO_PRESET, DEMO_SEED = "tiny", 0
DEMO_SENTENCES = [
    ("speech_0.wav", "the quick brown fox jumps over the lazy dog", "en-us", 160),
    ("speech_1.wav", "please write down what you hear in the audio", "en-gb", 150),
]
DEMO_SCENES = [("scene_tone.wav", "tone"), ("scene_chirp.wav", "chirp")]


def cache_root() -> Path:
    return Path(os.environ.get("SALMONN_EXPORT_CACHE") or user_cache_dir("salmonn-export"))


def _generator_hash() -> str:
    """Hash of the code that writes the demo, so a changed generator invalidates the cache."""
    from salmonn_export.model import synth, tiny

    h = hashlib.sha256()
    for mod in (tiny, synth):
        h.update(Path(mod.__file__).read_bytes())
    h.update(repr((DEMO_SENTENCES, DEMO_SCENES)).encode())
    return h.hexdigest()[:16]


def _stamp() -> dict:
    return {"tool_version": __version__, "preset": DEMO_PRESET, "seed": DEMO_SEED, "generator": _generator_hash(),
            "clips": [c[0] for c in DEMO_SENTENCES] + [c[0] for c in DEMO_SCENES]}


def demo_dir() -> Path:
    return cache_root() / "demo-model"


def is_fresh(folder: Path) -> bool:
    stamp = folder / "DEMO.json"
    if not stamp.is_file():
        return False
    try:
        if json.loads(stamp.read_text()) != _stamp():
            return False
    except ValueError:
        return False
    needed = ["config.yaml", "checkpoint_best.pth", "beats.pt", "llm/config.json", "whisper/config.json"]
    needed += [f"audio/{c}" for c in _stamp()["clips"]]
    return all((folder / n).is_file() for n in needed)


def ensure_demo_model() -> Path:
    """Path of the demo config.yaml, building the demo folder first if needed."""
    folder = demo_dir()
    if not is_fresh(folder):
        build = write_tiny_salmonn(folder.with_name(folder.name + ".building"), DEMO_PRESET, DEMO_SEED, force=True)
        audio = build / "audio"
        audio.mkdir()
        for name, text, voice, speed in DEMO_SENTENCES:
            speak(text, audio / name, voice=voice, speed=speed)
        for i, (name, kind) in enumerate(DEMO_SCENES):
            sf.write(str(audio / name), sound_scene(kind, seed=i), 16000, subtype="PCM_16")
        (build / "DEMO.json").write_text(json.dumps(_stamp(), indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        build.rename(folder)
    return folder / "config.yaml"


def demo_clips(task: str) -> list[Path]:
    """Demo clips for a task: speech for ASR, sound scenes for captioning."""
    folder = ensure_demo_model().parent / "audio"
    names = [c[0] for c in DEMO_SENTENCES] if task == "asr" else [c[0] for c in DEMO_SCENES]
    return [folder / n for n in names]


def ensure_demo_bundle(recipe_name: str = "w4a16") -> Path:
    """The demo model's engine bundle for a recipe, built on first use beside the demo model.

    Rebuilt when missing, unreadable, or made from another demo checkpoint than the current one.
    """
    from salmonn_export.errors import SalmonnError
    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.export.manifest import read_manifest, sha256_file
    from salmonn_export.recipes import load_recipe

    config = ensure_demo_model()
    bundle = cache_root() / "engines" / f"demo-{recipe_name}"
    try:
        manifest = read_manifest(bundle)
        if manifest["source"]["sha256"].get("ckpt") == sha256_file(config.parent / "checkpoint_best.pth"):
            return bundle
    except (SalmonnError, KeyError):
        pass
    build_bundle(config, load_recipe(recipe_name), BuildOptions(out=bundle, calib=config.parent / "audio", force=True))
    return bundle
