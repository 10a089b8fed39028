"""Test sets: the challenge's annotation JSON and plain audio folders.

Annotation JSON (spec 4): `{"annotation": [{"testset_id", "path", "task"?, "text"?, "Q"?}]}`;
`task` defaults to "asr"; task `aac` selects `audiocaption_v2`. Paths: `audio_root + '/' + path`
like the challenge's prefix when a root is given, else relative to the annotation file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from salmonn_export.errors import SalmonnError
from salmonn_export.tasks import TASK_KEYS

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def audio_files(folder: str | Path) -> list[Path]:
    """Every audio file below a folder, sorted; an empty folder is an error."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise SalmonnError("no audio files in this folder", folder)
    return files


@dataclass
class Example:
    testset_id: str
    audio: Path
    task: str  # the annotation's task key
    text: str | None = None
    question: str | None = None


def read_annotation(path: str | Path, task: str | None = None, audio_root: str | Path | None = None) -> list[Example]:
    """Parse and check an annotation file; with `task` (asr | aac), keep that task's items."""
    path = Path(path)
    if not path.is_file():
        raise SalmonnError("annotation file not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SalmonnError(f"annotation is not valid JSON ({exc})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("annotation"), list):
        raise SalmonnError("annotation must be an object with an `annotation` list", path)
    if task is not None and task not in TASK_KEYS:
        raise SalmonnError(f"unknown task `{task}`; choose asr or aac")
    wanted = TASK_KEYS.get(task) if task else None
    out, seen = [], set()
    for i, item in enumerate(data["annotation"]):
        if not isinstance(item, dict):
            raise SalmonnError(f"annotation item {i} is not an object", path)
        for key in ("testset_id", "path"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise SalmonnError(f"annotation item {i} lacks `{key}`", path)
        item_task = item.get("task", "asr")
        if not isinstance(item_task, str):
            raise SalmonnError(f"annotation item {i}: `task` must be a string", path)
        if wanted and item_task != wanted:
            continue
        if item["testset_id"] in seen:
            raise SalmonnError(f"duplicate testset_id `{item['testset_id']}`", path)
        seen.add(item["testset_id"])
        if audio_root is not None:
            audio = Path(f"{audio_root}/{item['path']}")
        else:
            audio = Path(item["path"]) if Path(item["path"]).is_absolute() else path.parent / item["path"]
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise SalmonnError(f"annotation item {i}: `text` must be a string", path)
        out.append(Example(item["testset_id"], audio, item_task, text, item.get("Q")))
    if task and not out:
        raise SalmonnError(f"no items with task `{wanted}` in this annotation", path)
    return out


