"""`eval` on a stranger's test set (found by a new-user try): every audio file checked before the
model loads, the model's own test set as the default, nothing left behind that blocks the corrected
rerun, and help that shows on/off flags as flags."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from test_cli_conventions import NO_TORCH_CLI, assert_one_line_error, cli

from salmonn_export.cli import app

ROOT = Path(__file__).resolve().parents[1]


def write_annotation(path: Path, audio: list[Path | str], task: str = "asr") -> Path:
    items = [{"testset_id": f"test{i:04d}", "path": str(a), "task": task, "text": "a b"} for i, a in enumerate(audio)]
    path.write_text(json.dumps({"annotation": items}))
    return path


@pytest.mark.parametrize("bad", ["missing", "folder", "text"])
def test_a_bad_audio_file_anywhere_in_the_set_stops_eval_before_the_model_loads(tmp_path, audio_dir, tiny_dir, bad):
    """The bad file is the last item: found in ~1 s from the paths and headers, not after the items
    before it have run (hours into a real test set), and the line says how to go on."""
    target = {"missing": tmp_path / "nosuch.wav", "folder": tmp_path, "text": tmp_path / "notes.wav"}[bad]
    if bad == "text":
        target.write_text("not audio")
    ann = write_annotation(tmp_path / "ann.json", [audio_dir / "tone_2s.wav", audio_dir / "speech_a.wav", target])
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_CLI, "eval", "--task", "asr", "--model",
                           tiny_dir / "config.yaml", "--annotation", ann, "--out", tmp_path / "sub.csv"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1] == "no torch", proc.stderr
    assert len(lines) == 2 and lines[0].startswith(f"error: {target}"), proc.stderr
    assert "--skip-bad-audio" in lines[0] and str(ann) in lines[0]
    assert not (tmp_path / "sub.csv").exists() and not (tmp_path / "sub.csv.partial.jsonl").exists()


def test_a_failure_before_any_item_finishes_leaves_no_partial_file_to_refuse_the_fix(tmp_path, audio_dir, tiny_dir,
                                                                                      capsys):
    """A clip whose header reads but which holds no samples fails at its turn; when it is the first,
    no partial file stays behind, so the corrected annotation runs without --restart."""
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    ann = write_annotation(tmp_path / "ann.json", [empty, audio_dir / "tone_2s.wav"])
    common = ["eval", "--task", "asr", "--model", tiny_dir / "config.yaml", "--annotation", ann, "--out",
              tmp_path / "sub.csv", "--json"]
    code, _, err = cli(capsys, *common)
    assert_one_line_error(code, err.split("\n", 1)[1], str(empty))  # after the `eval asr: ...` line
    assert not (tmp_path / "sub.csv.partial.jsonl").exists()
    write_annotation(ann, [audio_dir / "speech_a.wav", audio_dir / "tone_2s.wav"])
    code, out, err = cli(capsys, *common)
    assert code == 0, err
    assert json.loads(out)["rows"] == 2


def test_eval_of_a_model_defaults_to_its_configs_test_set(tmp_path, challenge_fixture, capsys):
    """`eval --model CONFIG` runs the config's `datasets.test_ann_path` (under `datasets.prefix`), as
    build and verify use the config's data; without one it is an error, not the demo's clips."""
    model = tmp_path / "model"
    shutil.copytree(challenge_fixture, model)
    expected = [item["testset_id"] for item in json.loads((model / "ann.json").read_text())["annotation"]
                if item["task"] == "asr"]
    code, out, err = cli(capsys, "eval", "--task", "asr", "--model", model / "config.yaml", "--out",
                         tmp_path / "sub.csv", "--json")
    assert code == 0, err
    assert f"eval asr: {model / 'ann.json'}" in err
    assert [line.split(",")[0] for line in (tmp_path / "sub.csv").read_text().splitlines()[1:]] == expected
    cfg = yaml.safe_load((model / "config.yaml").read_text())
    del cfg["datasets"]["test_ann_path"]
    (model / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = cli(capsys, "eval", "--task", "asr", "--model", model / "config.yaml", "--out", tmp_path / "b.csv")
    assert_one_line_error(code, err, "no test set", "test_ann_path", "--annotation")


def test_help_shows_on_off_flags_without_a_value_type(capsys):
    """typer labels flags `<bool>` as if they took a value; every command's help lists them bare."""
    import typer

    group = typer.main.get_command(app)
    assert {"eval", "build", "bench", "serve"} <= set(group.commands)
    for name in [None, *group.commands]:
        args = [name, "--help"] if name else ["--help"]
        with pytest.raises(SystemExit):
            app(args=args, prog_name="salmonn-export")
        text = capsys.readouterr().out
        assert "--help" in text and "<bool>" not in text, (name, text)


def test_help_paragraphs_are_wrapped_once(capsys, monkeypatch):
    """typer re-wraps a docstring paragraph's hard line breaks into ragged lines; every command's
    help paragraphs are single lines, so a wide terminal shows each paragraph whole."""
    import typer

    group = typer.main.get_command(app)
    for name, command in [("salmonn-export", group), *group.commands.items()]:
        assert all("\n" not in paragraph for paragraph in command.help.split("\n\n")), name
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        app(args=["validate-submission", "--help"], prog_name="salmonn-export")
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert any(line.startswith("Columns, ids") and line.endswith("or is a folder.") for line in lines), lines


def test_ids_the_challenge_rejects_are_said_before_the_run(tmp_path, challenge_fixture, capsys):
    """An id outside ^test\\d{4}$ makes the CSV an invalid submission that is not scored: said first,
    before the run (hours at real size), not only after it; the CSV is still written."""
    items = [{"testset_id": tid, "path": str(challenge_fixture / "audio" / "a.wav"), "task": "asr", "text": "a b"}
             for tid in ("sample_1", "test0001", "utt 3")]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": items}))
    code, _, err = cli(capsys, "eval", "--task", "asr", "--model", challenge_fixture / "config.yaml", "--annotation",
                       ann, "--out", tmp_path / "sub.csv")
    assert code == 0, err
    lines = err.splitlines()
    warned = [n for n, line in enumerate(lines) if "2 testset_ids (e.g. 'sample_1') do not match" in line]
    assert warned and warned[0] <= 2, err  # right after the `eval asr: ...` line
    assert "not scored" in err and (tmp_path / "sub.csv").read_text().count("\n") == 4
