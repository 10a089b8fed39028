"""eval / score / validate / merge: the challenge's metrics on tricky inputs, resumability, shards, bad files."""

import json

import numpy as np
import pytest
import soundfile as sf

from salmonn_export.dataset import read_annotation
from salmonn_export.errors import SalmonnError
from salmonn_export.harness.evaluate import EvalOptions, run_eval
from salmonn_export.harness.metrics import cider_d, compute_spider, compute_wer, wer_tokens
from salmonn_export.harness.submission import (
    merge_submissions,
    read_submission,
    validate_submission,
    write_submission,
)


def test_wer_normalises_like_the_challenge():
    assert wer_tokens("Mr. Smith's colour, twenty-one!") == wer_tokens("mister smith is color 21")
    refs = ["I'm going to the theatre at 9 o'clock.", "The colour is GREY; it costs twenty dollars."]
    hyps = ["i am going to the theater at nine o'clock", "the color is gray it costs $20"]
    assert compute_wer(hyps, refs)["wer"] == 0.0
    # hand-computed: 1 substitution + 1 deletion over 4 + 3 reference words
    result = compute_wer(["a b x d", "e f"], ["a b c d", "e f g"])
    assert (result["errors"], result["ref_words"]) == (2, 7) and result["wer_percent"] == pytest.approx(28.5714, abs=1e-4)


def test_wer_agrees_with_jiwer_where_normalisation_is_identity():
    jiwer = pytest.importorskip("jiwer")
    refs = ["the cat sat on the mat", "one small step for man", "hello there general kenobi"]
    hyps = ["the cat sat on mat", "one small step for a man", "hello general kenobi there"]
    assert compute_wer(hyps, refs)["wer"] == pytest.approx(jiwer.wer(refs, hyps))


def test_cider_d_hand_cases_and_quirks():
    refs = ["alpha beta gamma delta epsilon", "one two three four five"]
    assert compute_spider(refs, refs)["spider"] == 1000.0  # identical: every order's cosine is 1, ×10 ×100
    # hypotheses are lowercased but references are not: case now costs score
    cased = compute_spider(refs, ["Alpha beta gamma delta epsilon", "One two three four five"])["spider"]
    assert cased < 1000.0
    # the length penalty counts bigrams, with sigma 6
    short, _ = cider_d([["alpha", "beta"], ["one", "two"]], [[r.split()] for r in refs])
    assert 0 < short < 10
    with pytest.raises(SalmonnError, match="at least 2"):
        compute_spider(["a"], ["a"])


def _annotation(tmp_path, n=6, missing=()):
    items = []
    for i in range(n):
        path = tmp_path / f"clip{i}.wav"
        if i not in missing:
            sf.write(path, np.full(1600 * (i + 10), 0.01 * (i + 1)), 16000)
        items.append({"testset_id": f"test{i:04d}", "path": path.name, "task": "asr", "text": f"word{i} other"})
    items.append({"testset_id": "test9999", "path": "x.wav", "task": "audiocaption_v2", "text": "a cap"})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": items}))
    return ann


def _backend(calls, fail_after=None):
    def run(waves, tasks):
        calls.append(len(waves))
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("simulated crash")
        return [f"word{int(round(w[0] * 100)) - 1} other" if i % 2 == 0 else "" for i, w in enumerate(waves)]

    return run


def test_eval_writes_a_valid_csv_resumes_after_interrupt_and_shards_merge(tmp_path):
    pd = pytest.importorskip("pandas")
    ann = _annotation(tmp_path)
    examples = read_annotation(ann, "asr")
    assert len(examples) == 6 and examples[0].audio == tmp_path / "clip0.wav"
    full = run_eval(_backend([]), "fake", examples, EvalOptions(out=tmp_path / "full.csv", task="asr", batch_size=2))
    assert full["score"]["wer"] == 0.5  # every second item empty: 3 × 2 deletions over 6 × 2 words
    frame = pd.read_csv(tmp_path / "full.csv")  # the challenge validator reads it with pandas
    assert list(frame.columns) == ["testset_id", "text"] and all(isinstance(t, str) for t in frame["text"])
    assert validate_submission(tmp_path / "full.csv", examples)["valid"]
    calls = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(_backend(calls, fail_after=2), "fake", examples, EvalOptions(out=tmp_path / "r.csv", task="asr", batch_size=2))
    assert (tmp_path / "r.csv.partial.jsonl").is_file() and not (tmp_path / "r.csv").exists()
    resumed = run_eval(_backend([]), "fake", examples, EvalOptions(out=tmp_path / "r.csv", task="asr", batch_size=2))
    assert resumed["resumed_items"] == 4
    assert (tmp_path / "r.csv").read_bytes() == (tmp_path / "full.csv").read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(_backend([], fail_after=1), "fake", examples, EvalOptions(out=tmp_path / "x.csv", task="asr", batch_size=2))
    # that crash left a partial; a run with another batch size must not resume from it
    with pytest.raises(SalmonnError, match="another run"):
        run_eval(_backend([]), "fake", examples, EvalOptions(out=tmp_path / "x.csv", task="asr", batch_size=3))
    parts = []
    for i in range(3):
        run_eval(_backend([]), "fake", examples, EvalOptions(out=tmp_path / f"s{i}.csv", task="asr", shard=(i, 3),
                                                                batch_size=2))
        parts.append(tmp_path / f"s{i}.csv")
    write_submission(tmp_path / "merged.csv", merge_submissions(parts, examples))
    assert read_submission(tmp_path / "merged.csv") == read_submission(tmp_path / "full.csv")


def test_bad_audio_is_an_error_or_a_listed_skip(tmp_path):
    ann = _annotation(tmp_path, missing=(2,))
    examples = read_annotation(ann, "asr")
    with pytest.raises(SalmonnError, match="clip2.wav: audio file not found"):
        run_eval(_backend([]), "fake", examples, EvalOptions(out=tmp_path / "a.csv", task="asr"))
    summary = run_eval(_backend([]), "fake", examples, EvalOptions(out=tmp_path / "b.csv", task="asr", skip_bad_audio=True),
                       restart=True)
    assert [s["testset_id"] for s in summary["skipped"]] == ["test0002"] and summary["rows"] == 5


def test_bad_annotations(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SalmonnError, match="not valid JSON"):
        read_annotation(tmp_path / "bad.json", "asr")
    (tmp_path / "nokey.json").write_text(json.dumps({"annotation": [{"path": "a.wav"}]}))
    with pytest.raises(SalmonnError, match="lacks `testset_id`"):
        read_annotation(tmp_path / "nokey.json", "asr")
    (tmp_path / "shape.json").write_text(json.dumps({"items": []}))
    with pytest.raises(SalmonnError, match="`annotation` list"):
        read_annotation(tmp_path / "shape.json")
    with pytest.raises(SalmonnError, match="unknown task `sing`"):
        read_annotation(_annotation(tmp_path), "sing")
    (tmp_path / "aac_only.json").write_text(json.dumps({"annotation": [{"testset_id": "test0000", "path": "a.wav",
                                                                        "task": "audiocaption_v2"}]}))
    with pytest.raises(SalmonnError, match="no items with task `asr`"):
        read_annotation(tmp_path / "aac_only.json", "asr")


def test_validator_rules(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("testset_id,text\ntest0001,hello\nbad01,x\ntest0001,again\ntest0003,\n")
    report = validate_submission(path)
    joined = "\n".join(report["problems"])
    assert not report["valid"]
    assert "'bad01'" in joined and "duplicate testset_id: 'test0001'" in joined and "empty text" in joined
    (tmp_path / "cols.csv").write_text("id,text\ntest0001,x\n")
    assert "columns must be exactly" in validate_submission(tmp_path / "cols.csv")["problems"][0]
    write_submission(tmp_path / "ok.csv", [("test0000", ""), ("test0001", "a\rb, \"c\"")])
    assert validate_submission(tmp_path / "ok.csv")["valid"]
    assert read_submission(tmp_path / "ok.csv") == [("test0000", "\u00a0"), ("test0001", "a\rb, \"c\"")]


@pytest.mark.parametrize("name,text", [
    ("ann.csv", "testset_id,path,task,text\ntest0000,a.wav,asr,hello\n"),  # a spreadsheet's CSV export
    ("ann.tsv", "testset_id\tpath\ttask\ttext\ntest0000\ta.wav\tasr\thello\n"),
    ("ann.json", ""),  # an empty file
])
def test_a_non_json_annotation_names_the_expected_shape(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    shape = r'not valid JSON .*\{"annotation": \[\{"testset_id", "path", "task", "text"\}'
    with pytest.raises(SalmonnError, match=shape) as info:
        read_annotation(tmp_path / name, "asr")
    assert "CSV or spreadsheet annotations are not read" in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("fields,message", [
    ({"testset_id": 5}, r"annotation item 0: `testset_id` must be a string \(got int 5\)$"),
    ({"path": ["a.wav"]}, r'annotation item 0: `path` must be a string \(got list \["a.wav"\]\)$'),
    ({"path": None}, r"annotation item 0: `path` must be a string \(got null\)$"),
    ({"path": 3}, r"annotation item 0: `path` must be a string \(got int 3\)$"),
    ({"task": True}, r"annotation item 0: `task` must be a string \(got bool true\)$"),
    ({"text": {"en": "hi"}}, r'annotation item 0: `text` must be a string \(got dict \{"en": "hi"\}\)$'),
    ({"Q": 1.5}, r"annotation item 0: `Q` must be a string \(got float 1.5\)$"),
    ({"path": ""}, r"annotation item 0: `path` is empty$"),
])
def test_a_present_key_of_the_wrong_type_is_named_not_called_missing(tmp_path, fields, message):
    item = {"testset_id": "test0000", "path": "a.wav", "task": "asr", "text": "hi", **fields}
    (tmp_path / "ann.json").write_text(json.dumps({"annotation": [item]}))
    with pytest.raises(SalmonnError, match=r"ann.json: " + message):
        read_annotation(tmp_path / "ann.json", "asr")


def test_null_text_and_question_are_allowed(tmp_path):
    """Optional fields written as null (a test set without references) read as absent."""
    item = {"testset_id": "test0000", "path": "a.wav", "task": "asr", "text": None, "Q": None}
    (tmp_path / "ann.json").write_text(json.dumps({"annotation": [item]}))
    [example] = read_annotation(tmp_path / "ann.json", "asr")
    assert example.text is None and example.question is None and example.task == "asr"


def test_an_annotation_path_naming_a_folder_says_so(tmp_path):
    """`"path": "."` (the annotation's own folder) is a folder, not a missing file, as an error and as a skip."""
    ann = json.loads(_annotation(tmp_path).read_text())
    ann["annotation"][1]["path"] = "."
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    examples = read_annotation(tmp_path / "ann.json", "asr")
    with pytest.raises(SalmonnError) as info:
        run_eval(_backend([]), "fake", examples, EvalOptions(out=tmp_path / "a.csv", task="asr"))
    assert str(info.value) == f"{tmp_path}: is a folder, not an audio file"
    summary = run_eval(_backend([]), "fake", examples, EvalOptions(out=tmp_path / "b.csv", task="asr", skip_bad_audio=True),
                       restart=True)
    [skip] = summary["skipped"]
    assert skip["testset_id"] == "test0001" and "is a folder, not an audio file" in skip.values()
