"""Calibration sequences for GPTQ: what the LLM really sees.

Real audio runs through the reference's encoders, Q-Former and prompt wrap (for each task's
prompt), giving `inputs_embeds` with the 88 speech embeddings spliced in; where the data has a
reference text, its tokens (plus end_sym) are appended, teacher-forced, as in training.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from salmonn_export.audio import load_audio
from salmonn_export.dataset import audio_files, read_annotation
from salmonn_export.errors import SalmonnError, SalmonnWarning
from salmonn_export.model.salmonn import SALMONN
from salmonn_export.recipes import Calibration
from salmonn_export.tasks import short_task


@dataclass
class CalibItem:
    audio: Path
    text: str | None = None
    task: str | None = None


def calibration_items(source: str | Path, audio_root: str | Path | None = None) -> list[CalibItem]:
    """Audio from a folder (all audio files, sorted) or a challenge annotation JSON (with texts;
    its paths under `audio_root`, the config's `datasets.prefix`, when given)."""
    source = Path(source)
    if source.is_dir():
        return [CalibItem(p) for p in audio_files(source)]
    if source.suffix.lower() == ".json" and source.is_file():
        return [CalibItem(e.audio, e.text, short_task(e.task)) for e in read_annotation(source, audio_root=audio_root)]
    raise SalmonnError("calibration data must be an audio folder or an annotation .json", source)


@torch.no_grad()
def build_calibration(salmonn: SALMONN, items: list[CalibItem], settings: Calibration) -> list[dict[str, torch.Tensor]]:
    """One sequence per (clip, task) up to `settings.samples`, in a seeded order.

    With `settings.source == "text"` no audio is read: the prompt wrap gets no speech embeddings and
    items without a reference text are skipped (SalmonnError when none has one)."""
    gen = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(items), generator=gen).tolist()
    sequences: list[dict[str, torch.Tensor]] = []
    tok = salmonn.llama_tokenizer
    text_only = settings.source == "text"
    if text_only and not any(item.text for item in items):
        raise SalmonnError("text-only calibration (recipe calibration.source: text) needs an annotation .json "
                           "whose items have texts: pass --calib ANNOTATION.json (for the demo model, "
                           "`salmonn-export demo-data DIR` writes DIR/annotation.json)")
    for idx in order:
        item = items[idx]
        tasks = [item.task] if item.task else list(settings.tasks)
        if text_only:
            if not item.text:
                continue
            speech = salmonn.embed_tokens(torch.zeros(1, 0, dtype=torch.long))  # [1, 0, hidden]: no speech
        else:
            batch = salmonn.make_batch([load_audio(item.audio)], tasks[:1])
            speech = salmonn.encode_speech(batch)
        for task in tasks:
            embeds, atts = salmonn.prompt_wrap(speech, salmonn.prompts_for([task]))
            if settings.teacher_forcing and item.text:
                ids = tok(item.text + salmonn.config.generate.end_sym, add_special_tokens=False, return_tensors="pt").input_ids
                embeds = torch.cat([embeds, salmonn.embed_tokens(ids)], dim=1)
                atts = torch.cat([atts, torch.ones_like(ids)], dim=1)
            sequences.append({"inputs_embeds": embeds.float(), "attention_mask": atts})
            if len(sequences) >= settings.samples:
                return sequences
    warnings.warn(f"calibration asked for {settings.samples} sequences, the data gave {len(sequences)} "
                  f"({len(items)} items): GPTQ calibrates on fewer (lower --calib-samples or give more data)",
                  SalmonnWarning, stacklevel=2)
    return sequences
