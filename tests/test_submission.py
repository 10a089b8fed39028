"""Submission CSVs read as the challenge's pandas reader reads them, checked before scoring, written so that
pandas reads every text back as a string that scores as the original."""

import io
import json

import pandas as pd
import pytest
from pandas._libs.parsers import STR_NA_VALUES

from salmonn_export.dataset import Example, read_annotation
from salmonn_export.errors import SalmonnError
from salmonn_export.harness.metrics import compute_spider, compute_wer, wer_tokens
from salmonn_export.harness.scoring import score_submission
from salmonn_export.harness.submission import (
    PANDAS_NA_VALUES,
    read_submission,
    safe_text,
    validate_submission,
    write_submission,
)

NUMERIC_OR_BOOL = ["5", "-5", "+5", "0", "007", "1e5", "1E-3", ".5", "5.", "3.14", "inf", "-inf", "Infinity", "NaN ",
                   " nan", "nan ", "True", "TRUE", "true", "False", "FALSE", "false", " 5", "5 ", "\t5", "1_000"]


def _examples(n: int, texts=None) -> list[Example]:
    texts = texts or [f"reference number {i}" for i in range(n)]
    return [Example(f"test{i:04d}", f"{i}.wav", "asr", t) for i, t in enumerate(texts)]


def _annotation(tmp_path, texts) -> str:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"annotation": [{"testset_id": f"test{i:04d}", "path": f"{i}.wav", "task": "asr",
                                                "text": t} for i, t in enumerate(texts)]}))
    return path


def test_our_na_list_is_pandas_default():
    assert PANDAS_NA_VALUES == set(STR_NA_VALUES) | {""}


@pytest.mark.parametrize("text", sorted(STR_NA_VALUES | {""}))
def test_validator_flags_every_pandas_na_value(tmp_path, text):
    path = tmp_path / "s.csv"
    path.write_text(f"testset_id,text\ntest0000,hello\ntest0001,{text}\n", encoding="utf-8")
    assert pd.isna(pd.read_csv(path)["text"][1])  # the challenge's reader: NaN, which its validator rejects
    report = validate_submission(path)
    assert not report["valid"] and len(report["problems"]) == 1
    assert report["problems"][0].startswith("row 2 ('test0001'): ") and "read by pandas as missing (NaN)" in report["problems"][0]
    quoted = tmp_path / "q.csv"
    quoted.write_text(f'testset_id,text\ntest0000,hello\ntest0001,"{text}"\n', encoding="utf-8")
    assert not validate_submission(quoted)["valid"]  # quoting does not protect a text from na_values


@pytest.mark.parametrize("text", sorted(STR_NA_VALUES | {""}) + NUMERIC_OR_BOOL)
def test_writer_output_reads_back_as_strings_that_score_the_same(tmp_path, text):
    path = tmp_path / "s.csv"
    for rows in ([("test0000", text)], [("test0000", text), ("test0001", text)], [("test0000", "a cat"), ("test0001", text)]):
        write_submission(path, rows)
        seen = pd.read_csv(path)["text"].tolist()  # the challenge validator's read
        assert all(isinstance(v, str) for v in seen), (text, seen)
        assert validate_submission(path)["valid"]
        back = read_submission(path)
        assert [t for t, _ in back] == [t for t, _ in rows]
        for (_, original), (_, written) in zip(rows, back):
            assert written in (original, original + "\u00a0")
            assert wer_tokens(written) == wer_tokens(original)
            assert written.lower().split() == original.lower().split()  # the captioning metric's tokens
    refs = ["a cat", "reference words here"]
    hyps = [h for _, h in back]
    assert compute_spider(hyps, refs) == compute_spider(["a cat", text], refs)
    assert compute_wer(hyps, refs) == compute_wer(["a cat", text], refs)


def test_padding_is_score_neutral_under_the_challenges_normaliser():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "challenge_reference"))
    import challenge_metrics
    from test_metrics_normaliser import corpus

    for text in corpus(n_random=500) + sorted(PANDAS_NA_VALUES) + NUMERIC_OR_BOOL:
        assert challenge_metrics.tokens(text + "\u00a0") == challenge_metrics.tokens(text), text
    assert safe_text("hello") == "hello" and safe_text("nan") == "nan\u00a0" and safe_text("") == "\u00a0"


@pytest.mark.parametrize("name, data", [
    ("bom", b"\xef\xbb\xbftestset_id,text\ntest0000,hello world\ntest0001,a cat\n"),
    ("crlf", b"testset_id,text\r\ntest0000,hello world\r\ntest0001,a cat\r\n"),
    ("bom+crlf", b"\xef\xbb\xbftestset_id,text\r\ntest0000,hello world\r\ntest0001,a cat\r\n"),
    ("quoted", b'"testset_id","text"\n"test0000","hello world"\n"test0001","a cat"\n'),
    ("cr only", b"testset_id,text\rtest0000,hello world\rtest0001,a cat\r"),
    ("blank lines", b"testset_id,text\n\ntest0000,hello world\n\ntest0001,a cat\n\n"),
    ("no final newline", b"testset_id,text\ntest0000,hello world\ntest0001,a cat"),
])
def test_files_pandas_reads_are_read_and_scored(tmp_path, name, data):
    path = tmp_path / "s.csv"
    path.write_bytes(data)
    assert pd.read_csv(path).to_dict("list") == {"testset_id": ["test0000", "test0001"], "text": ["hello world", "a cat"]}
    assert read_submission(path) == [("test0000", "hello world"), ("test0001", "a cat")]
    result = score_submission(path, _examples(2, ["hello world", "a dog"]), "asr")
    assert result["errors"] == 1 and result["ref_words"] == 4


@pytest.mark.parametrize("data, problem", [
    (b"testset_id,text\ntest0000,caf\xe9\n", "not UTF-8 text: byte 0xe9 at line 2"),
    (b"\xff\xfet\x00e\x00s\x00t\x00", "not UTF-8 text: byte 0xff at line 1"),  # UTF-16
    (b"testset_id,text\ntest0000,\"unterminated\n", "pandas cannot read this CSV (EOF inside string"),
    (b"", "submission is empty"),
    (b"\xef\xbb\xbfid,text\ntest0000,x\n", "columns must be exactly testset_id,text (got ['id', 'text'])"),
    (b"testset_id\ttext\ntest0000\tx\n", "columns must be exactly testset_id,text (got ['testset_id\\ttext'])"),
    (b"testset_id,text,extra\ntest0000,x,y\n", "got ['testset_id', 'text', 'extra']"),
    (b"testset_id,text\ntest0000,a\ntest0001,a,b,c\n", "pandas cannot read this CSV (Expected 2 fields in line 3, saw 4)"),
])
def test_files_pandas_refuses_are_one_line_errors(tmp_path, data, problem):
    path = tmp_path / "s.csv"
    path.write_bytes(data)
    with pytest.raises(SalmonnError) as exc:
        read_submission(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert "\n" not in message and message.isprintable()
    with pytest.raises(SalmonnError, match="invalid submission|not UTF-8|cannot read|empty|columns"):
        score_submission(path, _examples(1), "asr")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(SalmonnError, match="nothere.csv: submission file not found"):
        read_submission(tmp_path / "nothere.csv")
    with pytest.raises(SalmonnError, match="is a folder, not a submission CSV"):
        score_submission(tmp_path, _examples(1), "asr")
    header_only = tmp_path / "h.csv"
    header_only.write_text("testset_id,text\n")
    assert read_submission(header_only) == []
    with pytest.raises(SalmonnError, match="2 annotation ids missing"):
        score_submission(header_only, _examples(2), "asr")


def test_score_checks_ids_before_computing_anything(tmp_path):
    examples = _examples(3)
    cases = {
        "duplicate": ("test0000,reference number 0\ntest0000,reference number 0\ntest0001,x\ntest0002,y\n",
                      "duplicate testset_id: 'test0000'"),
        "missing": ("test0000,reference number 0\ntest0001,x\n", "1 annotation ids missing, e.g. 'test0002'"),
        "unknown": ("test0000,a\ntest0001,b\ntest0002,c\ntest0009,d\n", "1 ids not in the annotation, e.g. 'test0009'"),
        "bad id": ("test0000,a\ntest0001,b\ntest002,c\n", "testset_id 'test002' does not match"),
        "nan text": ("test0000,a\ntest0001,null\ntest0002,c\n", "text 'null' is read by pandas as missing"),
        "numbers only": ("test0000,1\ntest0001,2\ntest0002,3\n", "text '1' is read by pandas as int"),
        "booleans only": ("test0000,True\ntest0001,false\ntest0002,TRUE\n", "is read by pandas as bool"),
        # pandas takes the first fields of a too-wide first row as an index, as the challenge's reader does
        "too wide": ("test0000,a,b,c\ntest0001,x,y,z\ntest0002,c,d,e\n", "testset_id 'b' does not match"),
        "invisible id": ("\u200btest0000,a\ntest0001,b\ntest0002,c\n", "testset_id '\\u200btest0000' does not match"),
    }
    for name, (body, problem) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.csv"
        path.write_text("testset_id,text\n" + body, encoding="utf-8")
        with pytest.raises(SalmonnError) as exc:
            score_submission(path, examples, "asr")
        assert problem in str(exc.value) and "invalid submission" in str(exc.value), name
        assert str(exc.value).isprintable()
        assert not validate_submission(path, examples)["valid"]


def test_issue_example_kinda_through_score(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('testset_id,text\nt1,"i kinda like it"\n')
    with pytest.raises(SalmonnError, match="testset_id 't1' does not match"):
        score_submission(path, [Example("t1", "a.wav", "asr", "i kind of like it")], "asr")
    path.write_text('testset_id,text\ntest0001,"i kinda like it"\n')
    result = score_submission(path, [Example("test0001", "a.wav", "asr", "i kind of like it")], "asr")
    assert result["wer_percent"] == 40.0 and result["items"][0]["errors"] == 2


def test_score_with_references_without_words(tmp_path):
    path = tmp_path / "s.csv"
    write_submission(path, [("test0000", "one two three four five six seven eight")])
    for reference in ["", "uh", "um, uh", "...", "?!"]:
        ann = _annotation(tmp_path, [reference])
        with pytest.raises(SalmonnError, match="WER is undefined"):
            score_submission(path, read_annotation(ann, "asr"), "asr", ann)


def test_pandas_reads_quoted_na_as_nan_too():
    # why quoting is not the fix: pandas applies na_values after unquoting
    df = pd.read_csv(io.StringIO('testset_id,text\ntest0000,"nan"\ntest0001,"null"\ntest0002,"nan\u00a0"\n'))
    assert pd.isna(df["text"][0]) and pd.isna(df["text"][1]) and df["text"][2] == "nan\u00a0"


def test_eval_scores_its_csv_like_score_and_reports_undefined_wer(tmp_path):
    import numpy as np
    import soundfile as sf

    from salmonn_export.harness.evaluate import EvalOptions, run_eval

    texts = ["nan", "", "5", "null words"]
    for i in range(4):
        sf.write(tmp_path / f"{i}.wav", np.full(16000, 0.1), 16000)
    ann = _annotation(tmp_path, ["nan", "hello", "5", "null words"])
    examples = read_annotation(ann, "asr")
    outputs = iter(texts)
    summary = run_eval(lambda waves, tasks: [next(outputs) for _ in waves], "fake", examples,
                       EvalOptions(out=tmp_path / "e.csv", task="asr"))
    assert all(isinstance(v, str) for v in pd.read_csv(tmp_path / "e.csv")["text"])
    scored = score_submission(tmp_path / "e.csv", examples, "asr", ann)
    assert summary["score"]["wer"] == scored["wer"] == compute_wer(texts, ["nan", "hello", "5", "null words"])["wer"] == 0.2
    empty_refs = _annotation(tmp_path, ["uh", "", "um, uh", "..."])
    outputs = iter(texts)
    summary = run_eval(lambda waves, tasks: [next(outputs) for _ in waves], "fake", read_annotation(empty_refs, "asr"),
                       EvalOptions(out=tmp_path / "u.csv", task="asr"))
    assert "score" not in summary and summary["score_error"].startswith("WER is undefined")
    assert (tmp_path / "u.csv").is_file()


def test_every_field_pandas_reads_as_non_string_is_padded_by_the_writer():
    import random

    rng = random.Random(0)
    alphabet = list("0123456789+-.eEdDxX _iInNfFaAtTrRuUlLsS#/%$") + ["inf", "nan", "true", "false", "NaN", "Infinity", "null"]
    candidates = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(2500)})
    non_strings = 0
    for text in candidates:
        value = pd.read_csv(io.StringIO(f"testset_id,text\ntest0000,{text}\n"))["text"][0]
        if not isinstance(value, str):
            non_strings += 1
            assert safe_text(text) != text, (text, value)
    assert non_strings > 50


HINT = "the challenge reads comma-separated CSV"


@pytest.mark.parametrize("name,data,problem", [
    ("semi.csv", b"testset_id;text\ntest0000;hello\n",
     "columns must be exactly testset_id,text (got ['testset_id;text']); the file seems to use ';' as separator; " + HINT),
    ("tab.csv", b"testset_id\ttext\ntest0000\thello\n",
     "columns must be exactly testset_id,text (got ['testset_id\\ttext']); the file seems to use tab as separator; " + HINT),
    ("bom_semi.csv", b"\xef\xbb\xbftestset_id;text\r\ntest0000;hello\r\n",  # a spreadsheet's "CSV UTF-8"
     "columns must be exactly testset_id,text (got ['testset_id;text']); the file seems to use ';' as separator; " + HINT),
    ("semi_commas.csv", b"testset_id;text\ntest0000;hi\ntest0001;a, b\n",  # a comma in a text: a field-count error
     "pandas cannot read this CSV (Expected 1 fields in line 3, saw 2); the file seems to use ';' as separator; " + HINT),
    ("semi.csv.gz", None,
     "columns must be exactly testset_id,text (got ['testset_id;text']); the file seems to use ';' as separator; " + HINT),
])
def test_a_semicolon_or_tab_separated_file_gets_a_separator_hint(tmp_path, name, data, problem):
    import gzip

    path = tmp_path / name
    path.write_bytes(data if data is not None else gzip.compress(b"testset_id;text\ntest0000;hello\n"))
    assert validate_submission(path) == {"valid": False, "rows": 0, "problems": [problem]}
    with pytest.raises(SalmonnError) as info:
        read_submission(path)
    assert str(info.value) == f"{path}: {problem}"


@pytest.mark.parametrize("header", [b"id,text", b"testset_id;text,extra", b"testset_id"])
def test_no_separator_hint_when_the_header_is_comma_separated_or_has_no_separator(tmp_path, header):
    (tmp_path / "s.csv").write_bytes(header + b"\ntest0000,hello\n")
    [problem] = validate_submission(tmp_path / "s.csv")["problems"]
    assert "separator" not in problem


@pytest.mark.parametrize("make,problem", [
    (lambda p: None, "submission file not found"),
    (lambda p: p.mkdir(), "is a folder, not a submission CSV"),
])
def test_a_missing_or_folder_submission_is_an_error_not_an_invalid_report(tmp_path, make, problem):
    """No file to report on: validate_submission raises like read_submission and scoring do."""
    path = tmp_path / "sub.csv"
    make(path)
    for check in (validate_submission, read_submission,
                  lambda p: score_submission(p, _examples(1), "asr")):
        with pytest.raises(SalmonnError) as info:
            check(path)
        assert str(info.value) == f"{path}: {problem}"
