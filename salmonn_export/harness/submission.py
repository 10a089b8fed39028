"""Submission CSVs, as the challenge writes, reads and checks them (annotations: `dataset.py`).

Reading: the challenge's validator reads a submission with `pandas.read_csv(path)` and its defaults
(UTF-8, a leading BOM dropped, CRLF or LF line ends, quoted fields, blank lines skipped, the
`na_values` list below turned into NaN, column types inferred). We read with the same call, so we
accept exactly what it accepts; anything it cannot read (bytes that are not UTF-8, unbalanced
quotes, ...) is one `SalmonnError` naming the file and the problem. Like that reader we decompress
by extension (.gz .bz2 .zip .xz .zst, .tar and .tar.gz/.bz2/.xz; `inferred_compression`), and refuse
a compressed file whose name does not say so ("looks gzip-compressed; name it ....csv.gz").

Checks (one place, `submission_problems`, used by `validate-submission`, `score` and `eval`): the
validator's three rules — columns exactly `testset_id,text`, ids matching `^test\\d{4}$`, every text
read as a string (an empty field, `nan`, `null`, `N/A`, ... or a column of only numbers is not) —
plus duplicate ids and, given the annotation, missing and unknown ids.

Writing: like pandas `to_csv(index=False)` (minimal quoting; a text holding a carriage return is
quoted too). A text that pandas' default reader would not read back as a string (an NA marker such
as `nan`, the empty text, a number, `True`/`False`) gets one trailing no-break space (U+00A0): pandas
then reads it as that string, and it scores exactly as the bare text (Whisper's normaliser turns
U+00A0 into a space and whitespace never makes a token; the captioning metric splits on
whitespace). Every written file is read back and checked before it replaces the target.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import re
import secrets
from collections import Counter
from pathlib import Path

from salmonn_export.dataset import Example
from salmonn_export.errors import SalmonnError

COLUMNS = ["testset_id", "text"]
ID_PATTERN = re.compile(r"^test\d{4}$")
# pandas' default `na_values` (`pandas._libs.parsers.STR_NA_VALUES`, pandas 2.x and 3.x, tested against
# the installed pandas): `read_csv` turns a field equal to one of these (after unquoting) into NaN.
PANDAS_NA_VALUES = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
# pandas' default true/false spellings: a column of only these is read as booleans
PANDAS_BOOL_VALUES = frozenset({"True", "TRUE", "true", "False", "FALSE", "false"})
SCORE_NEUTRAL_PAD = "\u00a0"


def _reads_as_non_string(text: str) -> bool:
    """Could pandas' default reader turn this field into something other than this string? (NaN,
    a number or a boolean; over-inclusive on purpose: padding a text never changes its score.)"""
    if text in PANDAS_NA_VALUES or text.strip() in PANDAS_BOOL_VALUES:
        return True
    try:
        float(text.strip())
    except ValueError:
        return False
    return True


def safe_text(text: str) -> str:
    """The text as written to a submission: unchanged, or with the score-neutral U+00A0 appended when
    pandas would otherwise read it as NaN, a number or a boolean."""
    return text + SCORE_NEUTRAL_PAD if _reads_as_non_string(text) else text


def csv_text(rows: list[tuple[str, str]]) -> str:
    """pandas-style minimal quoting, except that a text holding a carriage return is quoted too:
    Python's writer only quotes the line terminator it writes ("\n"), but readers (pandas' C parser
    included) end a row at a bare "\r"."""
    buf = io.StringIO()
    minimal = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    minimal.writerow(COLUMNS)
    for tid, text in rows:
        text = safe_text(text)
        (quoted if "\r" in text else minimal).writerow([tid, text])
    return buf.getvalue()


def write_submission(path: str | Path, rows: list[tuple[str, str]]) -> None:
    """Write `(testset_id, text)` rows atomically (temp file + rename), texts through `safe_text`;
    compressed as pandas would infer from the extension (.gz, .bz2, .xz, .zip, .zst).

    A path that cannot take the file (a folder, a read-only place, ...) is one SalmonnError naming it
    (`files.check_output_file`). The temp file is read back as the challenge reads it first; a text
    that would not come back as written is a bug here and raises RuntimeError (the target is left as it was)."""
    from salmonn_export.files import check_output_file, os_problem

    path = check_output_file(path, "submission CSV")
    compression = inferred_compression(path)
    if compression == "tar":
        raise SalmonnError("cannot write a tar archive; name the submission .csv (or .csv.gz, .csv.bz2, .csv.xz, "
                           ".csv.zip)", path)
    data = _compress(csv_text(rows).encode("utf-8"), compression, path)
    # the temp name keeps the target's extension, so pandas reads it back with the same compression
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}.{path.name}")
    try:
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise SalmonnError(os_problem(exc), path) from None
        raw, challenge_texts = _read_both(tmp)
        expected = [(t, safe_text(x)) for t, x in rows]
        bad = [i for i, (want, got, seen) in enumerate(zip(expected, raw, challenge_texts))
               if got != want or not isinstance(seen, str)]
        if len(raw) != len(rows) or bad:
            raise RuntimeError(f"internal error: the submission writer produced a file pandas misreads (rows {bad[:5]})")
        try:
            tmp.replace(path)
        except OSError as exc:
            raise SalmonnError(os_problem(exc), path) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


# pandas' `compression="infer"`: the first of these the lower-cased name ends with (pandas.io.common)
EXTENSION_COMPRESSION = (
    (".tar", "tar"), (".tar.gz", "tar"), (".tar.bz2", "tar"), (".tar.xz", "tar"),
    (".gz", "gzip"), (".bz2", "bz2"), (".zip", "zip"), (".xz", "xz"), (".zst", "zstd"),
)
EXTENSION_OF = {"gzip": ".gz", "bz2": ".bz2", "zip": ".zip", "xz": ".xz", "zstd": ".zst"}
# leading bytes of each format, to name a compressed file whose extension does not say so
MAGIC = (
    (b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"PK\x03\x04", "zip"), (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def inferred_compression(path: Path) -> str | None:
    """The compression pandas' `read_csv(path)` infers from the file name (None: plain text)."""
    name = path.name.lower()
    for ext, kind in EXTENSION_COMPRESSION:
        if name.endswith(ext):
            return kind
    return None


def _zstandard(path: Path):
    try:
        import zstandard
    except ImportError:
        raise SalmonnError("a .zst file needs the zstandard package (pip install zstandard), as pandas does",
                           path) from None
    return zstandard


def _compress(data: bytes, compression: str | None, path: Path) -> bytes:
    import bz2
    import gzip
    import lzma
    import zipfile

    if compression is None:
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "bz2":
        return bz2.compress(data)
    if compression == "xz":
        return lzma.compress(data)
    if compression == "zstd":
        return _zstandard(path).ZstdCompressor().compress(data)
    buf = io.BytesIO()  # zip: one member named as the file without .zip, as pandas writes it
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(path.name[: -len(".zip")] or "submission.csv", data)
    return buf.getvalue()


def _decompressed(path: Path) -> bytes:
    """The bytes pandas' default reader parses: the file, decompressed as its extension says.

    A compressed file whose name does not say so (pandas would parse the compressed bytes) and a
    named one that does not decompress are one SalmonnError each."""
    import bz2
    import gzip
    import lzma
    import tarfile
    import zipfile

    data = path.read_bytes()
    compression = inferred_compression(path)
    if compression is None:
        for magic, kind in MAGIC:
            if data.startswith(magic):
                raise SalmonnError(f"looks {kind}-compressed but the name does not say so (pandas reads it as "
                                   f"text); name it {path.stem}.csv{EXTENSION_OF[kind]}", path)
        return data
    try:
        if compression == "gzip":
            return gzip.decompress(data)
        if compression == "bz2":
            return bz2.decompress(data)
        if compression == "xz":
            return lzma.decompress(data)
        if compression == "zstd":
            return _zstandard(path).ZstdDecompressor().decompressobj().decompress(data)
        if compression == "zip":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = [n for n in zf.namelist() if not n.startswith("__MACOSX/") and not n.endswith("/")]
                if len(names) != 1:
                    raise SalmonnError(f"a zipped submission must hold exactly one file (found {len(names)})", path)
                return zf.read(names[0])
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
            if len(members) != 1:
                raise SalmonnError(f"a tar submission must hold exactly one file (found {len(members)})", path)
            return tf.extractfile(members[0]).read()
    except SalmonnError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decompressor's own error type
        raise SalmonnError(f"named {compression} by its extension but cannot be decompressed ({exc})", path) from None


def _check_utf8(path: Path) -> None:
    data = _decompressed(path)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SalmonnError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} (the challenge reads "
                           "submissions with pandas' UTF-8 default; save the file as UTF-8)", path) from None


def _read_both(path: Path) -> tuple[list[tuple[str, str]], list]:
    """(rows as the strings pandas tokenises, the `text` values the challenge's `pd.read_csv(path)` gives)."""
    import pandas as pd

    try:
        raw = pd.read_csv(path, dtype=object, keep_default_na=False, na_filter=False)
        challenge = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise SalmonnError("submission is empty (no header line)", path) from None
    except (pd.errors.ParserError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0].replace("Error tokenizing data. C error: ", "")
        raise SalmonnError(f"pandas cannot read this CSV ({message}){_separator_hint(path)}", path) from None
    if list(raw.columns) != COLUMNS:
        raise SalmonnError(f"columns must be exactly testset_id,text (got {list(map(str, raw.columns))!r})"
                           f"{_separator_hint(path)}", path)
    rows = [(str(t), str(x)) for t, x in zip(raw["testset_id"], raw["text"])]
    return rows, list(challenge["text"])


def _separator_hint(path: Path) -> str:
    """A hint when the header line has no comma but a `;` or a tab (a spreadsheet saving "CSV" in its
    locale's separator): otherwise the error shows only one odd column name or a field-count error."""
    header = _decompressed(path).split(b"\n", 1)[0].decode("utf-8", "replace")
    if "," in header:
        return ""
    for sep, name in ((";", "';'"), ("\t", "tab")):
        if sep in header:
            return f"; the file seems to use {name} as separator; the challenge reads comma-separated CSV"
    return ""


def read_submission(path: str | Path) -> list[tuple[str, str]]:
    """`(testset_id, text)` rows of a submission CSV, as strings exactly as pandas tokenises them.

    Raises SalmonnError (naming the file) when it is missing, not UTF-8, unreadable by pandas or
    lacks exactly the columns testset_id,text. Texts pandas would read as NaN are returned as written
    (`validate_submission` reports them)."""
    return _load(path)[0]


def _existing(path: str | Path) -> Path:
    """`path` when it is a file; a folder or missing file is a SalmonnError even for
    `validate_submission`, which reports a file's problems but has no file to report on then."""
    path = Path(path)
    if path.is_dir():
        raise SalmonnError("is a folder, not a submission CSV", path)
    if not path.is_file():
        raise SalmonnError("submission file not found", path)
    return path


def _load(path: str | Path) -> tuple[list[tuple[str, str]], list]:
    path = _existing(path)
    _check_utf8(path)
    return _read_both(path)


def submission_problems(rows: list[tuple[str, str]], challenge_texts: list, annotation: list[Example] | None) -> list[str]:
    """Every rule a submission breaks, one line each (repr() for ids and texts, so nothing is invisible).

    `challenge_texts`: the `text` values as pandas' default reader gives them (str, NaN, numbers)."""
    problems: list[str] = []
    for i, ((tid, raw), seen) in enumerate(zip(rows, challenge_texts), 1):
        if not ID_PATTERN.match(tid):
            problems.append(f"row {i}: testset_id {tid!r} does not match ^test\\d{{4}}$")
        if isinstance(seen, str):
            continue
        if isinstance(seen, float) and math.isnan(seen):
            what = "empty text" if raw == "" else f"text {raw!r}"
            problems.append(f"row {i} ({tid!r}): {what} is read by pandas as missing (NaN); the challenge validator "
                            "rejects it")
        else:
            problems.append(f"row {i} ({tid!r}): text {raw!r} is read by pandas as {type(seen).__name__} {seen!r}, "
                            "not a string (a column of only numbers or booleans); the challenge validator rejects it")
    counts = Counter(t for t, _ in rows)
    seen_ids = set(counts)
    dupes = sorted(t for t, n in counts.items() if n > 1)
    if dupes:
        problems.append(f"duplicate testset_id: {', '.join(map(repr, dupes[:5]))}"
                        + (f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""))
    if annotation is not None:
        expected = {e.testset_id for e in annotation}
        missing = sorted(expected - seen_ids)
        unknown = sorted(seen_ids - expected)
        if missing:
            problems.append(f"{len(missing)} annotation ids missing, e.g. {', '.join(map(repr, missing[:5]))}")
        if unknown:
            problems.append(f"{len(unknown)} ids not in the annotation, e.g. {', '.join(map(repr, unknown[:5]))}")
    return problems


def validate_submission(path: str | Path, annotation: list[Example] | None = None) -> dict:
    """`{"valid", "rows", "problems"}`: `submission_problems` of a file; a file that cannot be read at all
    is invalid with that one problem. Raises SalmonnError when there is no file (missing or a folder)."""
    path = _existing(path)
    try:
        rows, challenge_texts = _load(path)
    except SalmonnError as exc:
        return {"valid": False, "rows": 0, "problems": [exc.problem]}
    problems = submission_problems(rows, challenge_texts, annotation)
    return {"valid": not problems, "rows": len(rows), "problems": problems}


def checked_submission(path: str | Path, annotation: list[Example]) -> list[tuple[str, str]]:
    """The rows of a submission that passes every check against `annotation`, in file order.

    Raises SalmonnError naming the file with the problems (the first three, and how many in all)."""
    rows, challenge_texts = _load(path)
    problems = submission_problems(rows, challenge_texts, annotation)
    if problems:
        more = f" (and {len(problems) - 3} more; see validate-submission)" if len(problems) > 3 else ""
        raise SalmonnError(f"invalid submission: {'; '.join(problems[:3])}{more}", path)
    return rows


def merge_submissions(parts: list[str | Path], annotation: list[Example] | None = None) -> list[tuple[str, str]]:
    """Join shard CSVs; in annotation order when one is given (every id must be present once)."""
    rows: dict[str, str] = {}
    order: list[str] = []
    for part in parts:
        for tid, text in read_submission(part):
            if tid in rows:
                raise SalmonnError(f"testset_id {tid!r} appears in more than one shard", part)
            rows[tid] = text
            order.append(tid)
    if annotation is not None:
        missing = [e.testset_id for e in annotation if e.testset_id not in rows]
        if missing:
            raise SalmonnError(f"shards lack {len(missing)} ids, e.g. {', '.join(missing[:5])}")
        order = [e.testset_id for e in annotation]
    return [(t, rows[t]) for t in order]
