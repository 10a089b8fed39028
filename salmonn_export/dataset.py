"""Test sets: the challenge's annotation JSON and plain audio folders; which data a command uses.

Annotation JSON (spec 4): `{"annotation": [{"testset_id", "path", "task"?, "text"?, "Q"?}]}`;
`task` defaults to "asr"; task `aac` selects `audiocaption_v2`. Paths: `audio_root + '/' + path`
like the challenge's prefix when a root is given, else relative to the annotation file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from salmonn_export.audio import AUDIO_SUFFIXES, UNREADABLE_AUDIO_SUFFIXES
from salmonn_export.errors import SalmonnError, SalmonnWarning
from salmonn_export.model.config import SalmonnConfig
from salmonn_export.tasks import TASK_KEYS

_WARNED_FOLDERS: set[Path] = set()


def audio_files(folder: str | Path) -> list[Path]:
    """Every audio file below a folder, sorted (extensions in AUDIO_SUFFIXES, any case).

    Hidden files and folders (a leading dot: macOS `._clip.wav` AppleDouble files, `.Trash`, `.git`)
    are not audio and are left out. Files in containers soundfile cannot decode
    (UNREADABLE_AUDIO_SUFFIXES, e.g. .m4a) get one SalmonnWarning per folder naming how many and a
    conversion; a folder with none readable raises SalmonnError naming the folder (and those files,
    when that is why it is empty)."""
    folder = Path(folder)
    entries = sorted(p for p in folder.rglob("*")
                     if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    files = [p for p in entries if p.suffix.lower() in AUDIO_SUFFIXES]
    unreadable = [p for p in entries if p.suffix.lower() in UNREADABLE_AUDIO_SUFFIXES]
    if unreadable:
        kinds = ", ".join(sorted({p.suffix.lower() for p in unreadable}))
        note = (f"{len(unreadable)} {kinds} file(s) that soundfile (the challenge's audio loader) cannot decode, "
                f"e.g. {unreadable[0]}: convert them to WAV or FLAC first (ffmpeg -i IN -ar 16000 OUT.wav)")
        if not files:
            raise SalmonnError(f"no readable audio files in this folder: {note}", folder)
        if folder.resolve() not in _WARNED_FOLDERS:  # listed again by each stage that reads the folder
            _WARNED_FOLDERS.add(folder.resolve())
            warnings.warn(f"{folder}: skipping {note}", SalmonnWarning, stacklevel=2)
    if not files:
        raise SalmonnError("no audio files in this folder (readable: "
                           f"{' '.join(AUDIO_SUFFIXES)})", folder)
    return files


@dataclass
class Example:
    testset_id: str
    audio: Path
    task: str  # the annotation's task key
    text: str | None = None
    question: str | None = None


def challenge_task_keys() -> set[str]:
    """The task keys an annotation item may have: those of the challenge's `test_prompt.json`
    (evaluate_salmonn.py looks every item's task up there and fails on any other)."""
    from salmonn_export.model.prompts import builtin_test_prompts

    return set(builtin_test_prompts())


def _unknown_task(i: int, item: dict, known: Collection[str], path: Path) -> SalmonnError:
    task = item["task"]
    guess = [k for k in sorted(known) if k.lower() == task.lower()]
    if not guess and task in TASK_KEYS:  # a command-line task name (aac) instead of its key
        guess = [TASK_KEYS[task]]
    guess = guess or difflib.get_close_matches(task, sorted(known), n=1)
    hint = f" (did you mean `{guess[0]}`?)" if guess else ""
    return SalmonnError(f"annotation item {i} (`{item['testset_id']}`): unknown task `{task}`{hint}; tasks are the "
                        "challenge's prompt keys: asr, audiocaption_v2, ...", path)


_REQUIRED = object()


def _string_field(item: dict, i: int, key: str, path: Path, default: object = _REQUIRED) -> str | None:
    """Item `i`'s string `key`. A key that is there with another type (`"testset_id": 5`) says so
    with the value: reporting it as missing sends the user looking for a key they can see.
    Without `default` the key is required and not empty; with `default=None` a JSON null is allowed."""
    if key not in item:
        if default is _REQUIRED:
            raise SalmonnError(f"annotation item {i} lacks `{key}`", path)
        return default  # type: ignore[return-value]
    value = item[key]
    if value is None and default is None:
        return None
    if not isinstance(value, str):
        shown = json.dumps(value)
        got = "null" if value is None else f"{type(value).__name__} {shown if len(shown) <= 60 else shown[:57] + '...'}"
        raise SalmonnError(f"annotation item {i}: `{key}` must be a string (got {got})", path)
    if not value and default is _REQUIRED:
        raise SalmonnError(f"annotation item {i}: `{key}` is empty", path)
    return value


def read_annotation(path: str | Path, task: str | None = None, audio_root: str | Path | None = None,
                    known_tasks: Collection[str] | None = None) -> list[Example]:
    """Parse and check an annotation file; with `task` (asr | aac), keep that task's items.

    Every item's `task` must be one of `known_tasks` (default: `challenge_task_keys()`), whether
    or not `task` keeps it: a typo such as "ASR" is an error naming the item, never a silent skip.
    Raises SalmonnError naming the file for every problem.
    """
    path = Path(path)
    if not path.is_file():
        raise SalmonnError("annotation file not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SalmonnError(f"annotation is not valid JSON ({exc}); expected the challenge's "
                           '{"annotation": [{"testset_id", "path", "task", "text"}, ...]} (CSV or spreadsheet '
                           "annotations are not read: convert them to that JSON)", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("annotation"), list):
        raise SalmonnError("annotation must be an object with an `annotation` list", path)
    if task is not None and task not in TASK_KEYS:
        raise SalmonnError(f"unknown task `{task}`; choose asr or aac")
    wanted = TASK_KEYS.get(task) if task else None
    known = challenge_task_keys() if known_tasks is None else set(known_tasks)
    out, seen = [], set()
    for i, item in enumerate(data["annotation"]):
        if not isinstance(item, dict):
            raise SalmonnError(f"annotation item {i} is not an object", path)
        testset_id, item_path = (_string_field(item, i, key, path) for key in ("testset_id", "path"))
        item_task = _string_field(item, i, "task", path, default="asr")
        text, question = (_string_field(item, i, key, path, default=None) for key in ("text", "Q"))
        if item_task not in known:
            raise _unknown_task(i, {**item, "task": item_task}, known, path)
        if wanted and item_task != wanted:
            continue
        if testset_id in seen:
            raise SalmonnError(f"duplicate testset_id `{testset_id}`", path)
        seen.add(testset_id)
        if audio_root is not None:
            audio = Path(f"{audio_root}/{item_path}")
        else:
            audio = Path(item_path) if Path(item_path).is_absolute() else path.parent / item_path
        out.append(Example(testset_id, audio, item_task, text, question))
    if task and not out:
        raise SalmonnError(f"no items with task `{wanted}` in this annotation", path)
    if not out:  # build would calibrate on nothing, verify average nothing
        raise SalmonnError("annotation has no items", path)
    return out

# A config's own data, in the order a default picks it (spec 1.3: `datasets:` fields).
ANNOTATION_FIELDS = ("valid_ann_path", "test_ann_path", "train_ann_path")
DEMO_ORIGIN = "the demo clips"


@dataclass(frozen=True)
class DataSource:
    """Audio a command calibrates or verifies on, and where that choice came from.

    `path` is an audio folder or a challenge annotation .json; `origin` says why it was chosen
    (the option given, the config's `datasets.<field>`, or DEMO_ORIGIN); `audio_root` is the
    config's `datasets.prefix` (annotation paths are `prefix + '/' + path` there, spec 1.3), else
    None (paths relative to the annotation file).
    """

    path: Path
    origin: str
    audio_root: Path | None = None

    @property
    def is_demo(self) -> bool:
        return self.origin == DEMO_ORIGIN

    def record(self) -> dict:
        """What a manifest or report keeps: path, origin, prefix and sha256 — of the annotation file,
        or for a folder of the sorted `relative path  sha256` lines of its audio files."""
        if self.path.is_file():
            digest = _sha256(self.path.read_bytes())
        else:
            lines = [f"{f.relative_to(self.path).as_posix()}  {_sha256(f.read_bytes())}\n" for f in audio_files(self.path)]
            digest = _sha256("".join(lines).encode())
        return {"source": str(self.path), "origin": self.origin, "sha256": digest,
                "audio_root": None if self.audio_root is None else str(self.audio_root)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def choose_data(config: SalmonnConfig, given: str | Path | None, option: str, purpose: str,
                audio_root: str | Path | None = None) -> DataSource:
    """The data `build` calibrates on / `verify` checks with — never a silent fallback to the demo's.

    Order: the path given with `option` (e.g. "--calib"); else the config's own `datasets:`
    annotation (valid_ann_path, else test_ann_path, else train_ann_path) with `datasets.prefix` as
    audio root; else, only for the embedded demo model, its clips (DEMO_ORIGIN). Raises
    SalmonnError (naming the config) when none applies; `purpose` words it ("calibration").
    A named annotation that does not exist is an error, not a reason to try the next field.
    `audio_root` (--audio-root) goes with a `given` annotation: its paths are `audio_root + '/' + path`,
    as under the config's `datasets.prefix`; given without one, it is an error.
    """
    if given is None and audio_root is not None:
        raise SalmonnError(f"--audio-root goes with {option} ANNOTATION.json (the config's own annotation uses "
                           "`datasets.prefix`)", audio_root)
    if given is not None:
        if audio_root is not None and Path(given).is_dir():
            raise SalmonnError(f"--audio-root applies to an annotation .json, not to an audio folder ({option})", given)
        return check_source(DataSource(Path(given), option, Path(audio_root).resolve() if audio_root is not None
                                       else None), option)
    for name in ANNOTATION_FIELDS:
        source = config_annotation(config, name)
        if source is not None:
            return check_source(source, f"`datasets.{name}`")
    from salmonn_export.model.demo import demo_dir

    if config.path is not None and config.path.resolve() == (demo_dir() / "config.yaml").resolve():
        return DataSource(config.path.parent / "audio", DEMO_ORIGIN)
    raise SalmonnError(f"no {purpose} data: `datasets:` names no {', '.join(ANNOTATION_FIELDS)}; pass {option} "
                       "AUDIO_FOLDER or ANNOTATION.json", config.path)


def config_annotation(config: SalmonnConfig, name: str) -> DataSource | None:
    """The annotation the config's `datasets.<name>` names, `datasets.prefix` its audio root; None
    when the field is unset. Raises SalmonnError naming the config when the file does not exist."""
    datasets = config.datasets or {}
    value = datasets.get(name)
    if not value:
        return None
    path = config.resolve(str(value))
    if not path.is_file():
        raise SalmonnError(f"`datasets.{name}` names an annotation file that does not exist: {path}", config.path)
    prefix = datasets.get("prefix")
    return DataSource(path, f"datasets.{name}", config.resolve(str(prefix)) if prefix else None)


def check_source(source: DataSource, option: str) -> DataSource:
    """Fail before any model loads (minutes at real size) on data that cannot be used: a path that does
    not exist, an audio root that is not a folder, a folder without readable audio, a file that is not
    an annotation .json, or an annotation naming audio that is not there (every item is checked, not
    only those a calibration sample would draw). Raises SalmonnError naming the file; returns `source`."""
    path = source.path
    if not path.exists():
        raise SalmonnError(f"{option}: no such file or folder", path)
    if source.audio_root is not None and not source.audio_root.is_dir():
        raise SalmonnError("the audio root is not a folder" if source.audio_root.exists() else
                           "the audio root does not exist", source.audio_root)
    if path.is_dir():
        audio_files(path)
        return source
    if path.suffix.lower() != ".json":
        raise SalmonnError(f"{option} must be an audio folder or an annotation .json", path)
    examples = read_annotation(path, audio_root=source.audio_root)
    missing = [e for e in examples if not e.audio.is_file()]
    if missing:
        hint = (f"; the annotation's paths are read relative to {path.parent}: give --audio-root ROOT when they "
                "sit under a data prefix") if source.audio_root is None else ""
        raise SalmonnError(f"{len(missing)} of {len(examples)} annotation items name audio that is not there, "
                           f"the first {missing[0].testset_id}: {missing[0].audio}{hint}", path)
    return source
