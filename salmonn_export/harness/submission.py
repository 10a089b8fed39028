"""Test-set annotations in, submission CSVs out, as the challenge reads and checks them.

Annotation JSON (spec 4): `{"annotation": [{"testset_id", "path", "task"?, "text"?, "Q"?}]}`;
`task` defaults to "asr"; `--task aac` selects `audiocaption_v2`. Paths: `audio_root + '/' + path`
like the challenge's prefix when a root is given, else relative to the annotation file.

Submission CSV: exactly the columns `testset_id,text`, written like pandas `to_csv(index=False)`
(minimal quoting). An empty hypothesis is written as a single space: pandas reads an empty field
as NaN, which the challenge validator rejects; " " reads back as a string and scores like "".
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from salmonn_export.errors import SalmonnError

TASK_KEYS = {"asr": "asr", "aac": "audiocaption_v2"}
ID_PATTERN = re.compile(r"^test\d{4}$")
EMPTY_TEXT = " "


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


def csv_text(rows: list[tuple[str, str]]) -> str:
    """pandas-style minimal quoting, except that a text holding a carriage return is quoted too:
    Python's writer only quotes the line terminator it writes ("\n"), but readers (pandas' C parser
    included) end a row at a bare "\r"."""
    buf = io.StringIO()
    minimal = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    minimal.writerow(["testset_id", "text"])
    for tid, text in rows:
        text = text if text != "" else EMPTY_TEXT
        (quoted if "\r" in text else minimal).writerow([tid, text])
    return buf.getvalue()


def write_submission(path: str | Path, rows: list[tuple[str, str]]) -> None:
    """Atomic write (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(csv_text(rows))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_submission(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise SalmonnError("submission file not found", path)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise SalmonnError("submission is empty", path)
    if rows[0] != ["testset_id", "text"]:
        raise SalmonnError(f"columns must be exactly testset_id,text (got {','.join(rows[0])})", path)
    out = []
    for i, r in enumerate(rows[1:], 2):
        if len(r) != 2:
            raise SalmonnError(f"line {i} has {len(r)} fields, expected 2", path)
        out.append((r[0], r[1]))
    return out


def validate_submission(path: str | Path, annotation: list[Example] | None = None) -> dict:
    """The challenge validator's three rules (columns, `^test\\d{4}$` ids, string texts — an empty field
    is NaN to pandas and fails) plus duplicate ids and, with an annotation, missing/unknown ids."""
    problems: list[str] = []
    try:
        rows = read_submission(path)
    except SalmonnError as exc:
        return {"valid": False, "rows": 0, "problems": [exc.problem]}
    ids = [r[0] for r in rows]
    for i, (tid, text) in enumerate(rows, 2):
        if not ID_PATTERN.match(tid):
            problems.append(f"line {i}: testset_id {tid!r} does not match ^test\\d{{4}}$")
        if text == "":
            problems.append(f"line {i}: empty text (pandas reads it as NaN; the challenge validator rejects it)")
    dupes = sorted({t for t in ids if ids.count(t) > 1})
    if dupes:
        problems.append(f"duplicate testset_id: {', '.join(dupes[:5])}")
    if annotation is not None:
        expected = {e.testset_id for e in annotation}
        missing = sorted(expected - set(ids))
        unknown = sorted(set(ids) - expected)
        if missing:
            problems.append(f"{len(missing)} annotation ids missing, e.g. {', '.join(missing[:5])}")
        if unknown:
            problems.append(f"{len(unknown)} ids not in the annotation, e.g. {', '.join(unknown[:5])}")
    return {"valid": not problems, "rows": len(rows), "problems": problems}


def merge_submissions(parts: list[str | Path], annotation: list[Example] | None = None) -> list[tuple[str, str]]:
    """Join shard CSVs; in annotation order when one is given (every id must be present once)."""
    rows: dict[str, str] = {}
    order: list[str] = []
    for part in parts:
        for tid, text in read_submission(part):
            if tid in rows:
                raise SalmonnError(f"testset_id `{tid}` appears in more than one shard", part)
            rows[tid] = text
            order.append(tid)
    if annotation is not None:
        missing = [e.testset_id for e in annotation if e.testset_id not in rows]
        if missing:
            raise SalmonnError(f"shards lack {len(missing)} ids, e.g. {', '.join(missing[:5])}")
        order = [e.testset_id for e in annotation]
    return [(t, rows[t]) for t in order]
