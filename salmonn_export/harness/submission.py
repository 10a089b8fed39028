"""Submission CSVs, as the challenge writes, reads and checks them (annotations: `dataset.py`).

Submission CSV: exactly the columns `testset_id,text`, written like pandas `to_csv(index=False)`
(minimal quoting). An empty hypothesis is written as a single space: pandas reads an empty field
as NaN, which the challenge validator rejects; " " reads back as a string and scores like "".
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from salmonn_export.dataset import Example
from salmonn_export.errors import SalmonnError

ID_PATTERN = re.compile(r"^test\d{4}$")
EMPTY_TEXT = " "


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
