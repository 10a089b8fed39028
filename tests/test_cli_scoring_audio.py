"""The CLI faces of issue 16 items 1-7: score/validate-submission on hostile CSVs, generate on NaN and long audio."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def _one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].isprintable() and "\ufeff" not in lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


def test_score_cli_on_the_issues_examples_and_their_kin(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": [
        {"testset_id": "test0000", "path": "a.wav", "task": "asr", "text": "i kind of like it"},
        {"testset_id": "test0001", "path": "b.wav", "task": "asr", "text": "hello world"}]}))
    files = {
        "ok": b"testset_id,text\ntest0000,i kinda like it\ntest0001,hello world\n",
        "spreadsheet": b"\xef\xbb\xbftestset_id,text\r\ntest0000,\"i kinda like it\"\r\ntest0001,hello world\r\n",
        "dup": b"testset_id,text\ntest0000,i kinda like it\ntest0000,i kinda like it\ntest0001,hello world\n",
        "nan": b"testset_id,text\ntest0000,null\ntest0001,nan\n",
        "latin1": b"testset_id,text\ntest0000,caf\xe9\ntest0001,hello world\n",
        "bomcols": b"\xef\xbb\xbf\xef\xbb\xbftestset_id,text\ntest0000,a\ntest0001,b\n",
    }
    for name, data in files.items():
        (tmp_path / f"{name}.csv").write_bytes(data)
    for name in ("ok", "spreadsheet"):
        proc = cli("score", "--task", "asr", "--submission", tmp_path / f"{name}.csv", "--annotation", ann)
        assert proc.returncode == 0 and proc.stdout.strip() == "WER: 28.5714%", proc.stderr  # 2 errors / 7 words
    _one_error_line(cli("score", "--submission", tmp_path / "dup.csv", "--annotation", ann),
                    "dup.csv: invalid submission: duplicate testset_id: 'test0000'")
    _one_error_line(cli("score", "--submission", tmp_path / "nan.csv", "--annotation", ann),
                    "text 'null' is read by pandas as missing (NaN)")
    _one_error_line(cli("score", "--submission", tmp_path / "latin1.csv", "--annotation", ann),
                    "latin1.csv: not UTF-8 text: byte 0xe9 at line 2")
    _one_error_line(cli("score", "--submission", tmp_path / "bomcols.csv", "--annotation", ann),
                    "columns must be exactly testset_id,text (got ['\\ufefftestset_id', 'text'])")
    report = cli("validate-submission", tmp_path / "nan.csv", "--json")
    assert report.returncode == 1 and len(json.loads(report.stdout)["problems"]) == 2
    empty = tmp_path / "empty_refs.json"
    empty.write_text(json.dumps({"annotation": [
        {"testset_id": "test0000", "path": "a.wav", "text": ""}, {"testset_id": "test0001", "path": "b.wav", "text": "uh"}]}))
    _one_error_line(cli("score", "--submission", tmp_path / "ok.csv", "--annotation", empty), "WER is undefined")
    helptext = cli("score", "--help").stdout
    assert "WER is undefined" in " ".join(helptext.split()) and "validate-submission check" in " ".join(helptext.split())


def test_generate_refuses_non_finite_audio_and_warns_about_dropped_audio(tmp_path, tiny_dir):
    wave = np.full(16000, 0.1)
    wave[3] = np.inf
    sf.write(tmp_path / "inf.wav", wave, 16000, subtype="FLOAT")
    proc = cli("generate", "--model", tiny_dir / "config.yaml", "--max-new-tokens", "2", tmp_path / "inf.wav")
    _one_error_line(proc, f"{tmp_path / 'inf.wav'}: audio holds 1 non-finite samples (NaN or ±inf)")
    assert proc.stdout == ""
    sf.write(tmp_path / "long.wav", np.full(22050 * 35, 0.05), 22050, subtype="PCM_16")
    sf.write(tmp_path / "short.wav", np.full(22050 * 3, 0.05), 22050, subtype="PCM_16")
    proc = cli("generate", "--model", tiny_dir / "config.yaml", "--max-new-tokens", "2", "--json",
               tmp_path / "long.wav", tmp_path / "short.wav")
    assert proc.returncode == 0, proc.stderr
    assert [r["dropped_seconds"] for r in json.loads(proc.stdout)["results"]] == [5.0, 0.0]
    assert f"warning: {tmp_path / 'long.wav'}: 35.0 s of audio; only the first 30 s are used (5.0 s dropped" in proc.stderr
    assert "short.wav" not in proc.stderr


def test_a_missing_or_folder_submission_is_one_error_line_exit_2_for_validate_and_score(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": [{"testset_id": "test0000", "path": "a.wav", "task": "asr", "text": "hi"}]}))
    (tmp_path / "folder.csv").mkdir()
    for name, problem in (("nothere.csv", "submission file not found"), ("folder.csv", "is a folder, not a submission CSV")):
        for args in (("validate-submission", tmp_path / name), ("score", "--submission", tmp_path / name, "--annotation", ann)):
            proc = cli(*args)
            _one_error_line(proc, f"error: {tmp_path / name}: {problem}")
            assert proc.stdout == ""


def test_a_semicolon_csv_gets_the_separator_hint_from_both_commands(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": [{"testset_id": "test0000", "path": "a.wav", "task": "asr", "text": "hi"}]}))
    (tmp_path / "semi.csv").write_text("testset_id;text\ntest0000;hi\n")
    hint = "the file seems to use ';' as separator; the challenge reads comma-separated CSV"
    _one_error_line(cli("score", "--submission", tmp_path / "semi.csv", "--annotation", ann), hint)
    report = cli("validate-submission", tmp_path / "semi.csv")
    assert report.returncode == 1 and hint in report.stdout
