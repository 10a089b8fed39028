"""The CLI end to end: tiny, inspect, generate, and one-line errors with non-zero exits."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_tiny_inspect_generate_json(tmp_path, audio_dir):
    made = json.loads(run("tiny", tmp_path / "m", "--seed", "1", "--json").stdout)
    config = made["config"]
    assert made["files"]["checkpoint_best.pth"] > 0 and "llm/tokenizer.json" in made["files"]
    report = json.loads(run("inspect", "--model", config, "--json").stdout)
    assert report["components"]["qformer"]["speech_tokens"] == 88
    assert report["components"]["lora"]["targets"] == ["q_proj", "v_proj"]
    assert report["problems"] == []
    out = json.loads(run("generate", "--model", config, "--task", "asr", "--json", "--max-new-tokens", "4",
                         audio_dir / "speech_a.wav", audio_dir / "stereo_22k.wav").stdout)
    assert [r["audio"] for r in out["results"]] == [str(audio_dir / "speech_a.wav"), str(audio_dir / "stereo_22k.wav")]
    assert all(isinstance(r["text"], str) for r in out["results"])


def test_errors_are_one_line_with_nonzero_exit(tmp_path, tiny_dir, audio_dir):
    proc = run("generate", "--model", tmp_path / "missing.yaml", audio_dir / "tone_2s.wav", check=False)
    assert proc.returncode == 2 and "missing.yaml: config file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("generate", "--model", tiny_dir / "config.yaml", audio_dir / "broken.wav", check=False)
    assert proc.returncode == 2 and "broken.wav: unreadable audio" in proc.stderr
    # a bad file after a good one: found from its header before anything runs, so no partial output
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    proc = run("generate", "--model", tiny_dir / "config.yaml", audio_dir / "tone_2s.wav", text, "--json", check=False)
    assert proc.returncode == 2 and f"{text}: unreadable audio" in proc.stderr and proc.stdout == ""
    # every path is checked before the model loads: no result of the good file, one line for the missing one
    proc = run("generate", "--model", tiny_dir / "config.yaml", audio_dir / "tone_2s.wav", tmp_path / "nosuch.wav",
               check=False)
    assert proc.returncode == 2 and "nosuch.wav: audio file not found" in proc.stderr and proc.stdout == ""
    proc = run("generate", "--model", tiny_dir / "config.yaml", audio_dir, check=False)
    assert proc.returncode == 2 and "is a folder; give audio files" in proc.stderr
    proc = run("generate", "--model", tiny_dir / "config.yaml", "--task", "nope", audio_dir / "tone_2s.wav", check=False)
    assert proc.returncode == 2 and "unknown task `nope`" in proc.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    proc = run("tiny", tmp_path / "taken", check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_inspect_notes_ignored_fields_and_exits_1_only_on_problems(challenge_fixture, tmp_path):
    """The challenge's own config carries `Low_resource` (ignored there, and here): a note, exit 0. An
    end_sym that is not one token would make every output run to max_new_tokens: a problem, exit 1."""
    proc = run("inspect", "--model", challenge_fixture / "config.yaml", "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["problems"] == []
    assert any("Low_resource" in n for n in report["notes"])
    text = run("inspect", "--model", challenge_fixture / "config.yaml", check=False)
    assert text.returncode == 0 and "note: `model.Low_resource`" in text.stdout
    model = tmp_path / "model"
    model.mkdir()
    for entry in challenge_fixture.iterdir():
        if entry.name != "config.yaml":
            (model / entry.name).symlink_to(entry)
    raw = (challenge_fixture / "config.yaml").read_text()
    assert "end_sym:" in raw
    lines = [("  end_sym: 'no such token here'" if line.strip().startswith("end_sym:") else line) for line in raw.splitlines()]
    (model / "config.yaml").write_text("\n".join(lines) + "\n")
    bad = run("inspect", "--model", model / "config.yaml", "--json", check=False)
    assert bad.returncode == 1
    assert any("is not one token of this tokenizer" in p for p in json.loads(bad.stdout)["problems"])


def test_help_teaches_with_examples():
    for cmd in ("tiny", "inspect", "generate", "merge", "demo-data", "serve", "bench", "run", "eval", "recipes"):
        assert "Example:" in run(cmd, "--help").stdout


def test_build_run_verify_inspect_bundle_cli(tmp_path, tiny_dir, audio_dir):
    bundle = tmp_path / "b"
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.wav").write_bytes((audio_dir / "speech_a.wav").read_bytes())
    report = json.loads(run("build", "--recipe", "w8a16", "--model", tiny_dir / "config.yaml", "--out", bundle,
                            "--calib", calib, "--json").stdout)
    assert report["sizes"]["decoder"] > 0 and report["validation"]["decoder"]["max_rel"] < 1e-4
    from salmonn_export.files import current_umask

    umask = current_umask()
    for p in [bundle, *bundle.rglob("*")]:  # readable by a service account: umask-respecting, not mkdtemp's 0700
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
    proc = run("build", "--recipe", "w8a16", "--model", tiny_dir / "config.yaml", "--out", bundle, check=False)
    assert proc.returncode == 2 and "use --force" in proc.stderr
    proc = run("build", "--recipe", "nope", "--model", tiny_dir / "config.yaml", check=False)
    assert proc.returncode == 2 and "unknown recipe `nope`" in proc.stderr
    out = json.loads(run("run", "--engine", bundle, "--task", "aac", "--json", "--max-new-tokens", "3",
                         audio_dir / "tone_2s.wav").stdout)
    assert len(out["results"]) == 1
    manifest = json.loads(run("inspect", bundle, "--json").stdout)
    assert manifest["quantization"]["bits"] == 8
    proc = run("verify", bundle, "--data", calib, "--report", tmp_path / "v.json", "--json", check=False)
    assert proc.returncode in (0, 1)
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["verdict"]["passed"] == (proc.returncode == 0)
    assert (tmp_path / "v.md").read_text().startswith("# verify:")
    assert "recipes" not in run("recipes", "--json").stderr


def test_demo_data_eval_score_validate_merge_cli(tmp_path, tiny_dir):
    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe

    info = json.loads(run("demo-data", tmp_path / "set", "--json").stdout)
    assert info["annotation"] == str((tmp_path / "set" / "annotation.json").resolve())
    ann = json.loads((tmp_path / "set" / "annotation.json").read_text())["annotation"]
    assert {a["task"] for a in ann} == {"asr", "audiocaption_v2"} and all(a["text"] for a in ann)
    bundle = tmp_path / "b"
    build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=bundle))
    common = ["--annotation", tmp_path / "set" / "annotation.json"]
    summary = json.loads(run("eval", "--task", "aac", "--engine", bundle, *common, "--out", tmp_path / "aac.csv",
                             "--json").stdout)
    assert summary["rows"] == sum(a["task"] == "audiocaption_v2" for a in ann) and "spider" in summary["score"]
    assert (tmp_path / "aac.score.json").is_file()
    scored = json.loads(run("score", "--task", "aac", "--submission", tmp_path / "aac.csv", *common, "--json").stdout)
    assert scored["spider"] == summary["score"]["spider"]
    for i in range(2):
        run("eval", "--task", "asr", "--engine", bundle, *common, "--shard", f"{i}/2", "--out", tmp_path / f"p{i}.csv")
    merged = json.loads(run("merge", tmp_path / "p0.csv", tmp_path / "p1.csv", "--out", tmp_path / "asr.csv", *common,
                            "--task", "asr", "--json").stdout)
    assert merged["rows"] == sum(a["task"] == "asr" for a in ann) and merged["csv"] == str(tmp_path / "asr.csv")
    run("eval", "--task", "asr", "--engine", bundle, *common, "--out", tmp_path / "whole.csv")
    assert (tmp_path / "asr.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert run("validate-submission", tmp_path / "asr.csv", *common, "--task", "asr").returncode == 0
    bad = run("validate-submission", tmp_path / "asr.csv", *common, "--task", "aac", check=False)
    assert bad.returncode == 1 and "missing" in bad.stdout


def test_cli_prints_our_warning_once_as_one_line(tmp_path, tiny_dir, audio_dir, calib_audio_dir):
    """The CLI silences library warnings but prints ours: `run` on a w8a16 bundle (ONNX Runtime's
    slow 8-bit CPU path) says so once, as one `warning:` line."""
    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe

    bundle = tmp_path / "w8a16"
    build_bundle(tiny_dir / "config.yaml", load_recipe("w8a16"), BuildOptions(out=bundle, calib=calib_audio_dir))
    proc = run("run", "--engine", bundle, "--task", "asr", "--max-new-tokens", "2",
               audio_dir / "speech_a.wav", audio_dir / "stereo_22k.wav")
    lines = [line for line in proc.stderr.splitlines() if "accuracy_level" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: recipe w8a16:") and "w8a8" in lines[0]


def test_a_file_name_with_a_tab_or_newline_keeps_one_output_line(tiny_dir, audio_dir, tmp_path):
    odd = [tmp_path / "tab\there.wav", tmp_path / "new\nline.wav"]
    for path in odd:
        shutil.copy(audio_dir / "tone_2s.wav", path)
    proc = run("generate", "--model", tiny_dir / "config.yaml", *odd)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and [line.split("\t")[0] for line in lines] == [repr(str(p)) for p in odd]
