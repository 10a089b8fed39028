"""Command-line conventions (issue 16, items 8-12): range-checked options and config values, serve
checking its bundle before announcing, unknown annotation tasks, umask-respecting outputs, SIGTERM
cleaning up like Ctrl-C. Every bad input: one line, exit 2, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from salmonn_export.cli import app
from salmonn_export.dataset import read_annotation
from salmonn_export.errors import SalmonnError
from salmonn_export.files import atomic_dir, atomic_write_text
from salmonn_export.model.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
# the CLI as the console script runs it, then whether torch was imported (bad input must stop before it)
NO_TORCH_CLI = ("import sys\nfrom salmonn_export.cli import app\nsys.argv = ['salmonn-export', *sys.argv[1:]]\n"
                "try:\n    app()\nfinally:\n    print('torch imported' if 'torch' in sys.modules else 'no torch', "
                "file=sys.stderr)\n")


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the app in-process through its entry point (as the console script does)."""
    with pytest.raises(SystemExit) as exit_info:
        app(args=[str(a) for a in args], prog_name="salmonn-export")
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    """The promise for bad input: exit 2, one `error:` line holding every needle, no traceback; returns the line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------ item 8: numeric options

@pytest.mark.parametrize("args, needle", [
    (["run", "--max-new-tokens", "0", "x.wav"], "'--max-new-tokens': must be >= 1, got 0"),
    (["generate", "--max-new-tokens", "0", "x.wav"], "'--max-new-tokens': must be >= 1, got 0"),
    (["generate", "--num-beams", "0"], "'--num-beams': must be >= 1"),
    (["run", "--num-beams", "-3"], "'--num-beams': must be >= 1, got -3"),
    (["run", "--batch-size", "0"], "'--batch-size': must be >= 1"),
    (["verify", "--num-beams", "0"], "'--num-beams'"),
    (["eval", "--limit", "0"], "'--limit': must be >= 1"),
    (["eval", "--batch-size", "-1"], "'--batch-size'"),
    (["eval", "--ray-actors", "0"], "'--ray-actors'"),
    (["build", "--calib-samples", "0"], "'--calib-samples'"),
    (["build", "--seed", "-1"], "'--seed': must be >= 0"),
    (["tiny", "/tmp/never-written", "--seed", str(2**40)], "'--seed': must be <= 4294967295"),
    (["demo-data", "/tmp/never-written", "--seed", "-5"], "'--seed'"),
    (["bench", "--warmup", "-1"], "'--warmup'"),
    (["bench", "--iters", "0"], "'--iters'"),
    (["bench", "--audio-seconds", "0"], "'--audio-seconds': must be > 0"),
    (["bench", "--audio-seconds", "nan"], "must be a finite number"),
    (["bench", "--audio-seconds", "31"], "must be <= 30"),
    (["bench", "--new-tokens", "0"], "'--new-tokens'"),
    (["serve", "--port", "0"], "'--port': must be >= 1"),
    (["serve", "--port", "65536"], "must be <= 65535"),
    (["serve", "--max-wait-ms", "inf"], "must be a finite number"),
    (["serve", "--max-upload-mb", "0"], "'--max-upload-mb': must be > 0"),
    (["serve", "--request-timeout-s", "-1"], "'--request-timeout-s'"),
    (["serve", "--replicas", "0"], "'--replicas'"),
    (["run", "--batch-size", "abc"], "'--batch-size'"),
    (["run", "--no-such-option"], "No such option"),
])
def test_numeric_options_out_of_range_are_one_line_exit_2(capsys, args, needle):
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, needle, f"{args[0]} --help")


def test_bench_json_is_a_flag_and_a_json_path_says_so(capsys, tmp_path):
    code, _, err = cli(capsys, "bench", tmp_path / "bench.json")
    assert_one_line_error(code, err, "--json` is a flag now", "--out PATH")


def _config_with(tiny_dir: Path, **generate) -> Path:
    raw = yaml.safe_load((tiny_dir / "config.yaml").read_text())
    raw.setdefault("generate", {}).update(generate)
    path = tiny_dir / f"bad-{'-'.join(generate)}.yaml"  # beside the model: its relative paths still resolve
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("field, value, needle", [
    ("max_new_tokens", 0, "`generate.max_new_tokens` must be >= 1, got 0"),
    ("num_beams", 0, "`generate.num_beams` must be >= 1"),
    ("min_length", -1, "`generate.min_length` must be >= 0"),
    ("temperature", -1.0, "`generate.temperature` must be >= 0"),
    ("top_p", 1.5, "`generate.top_p` must be between 0 and 1"),
    ("repetition_penalty", 0, "`generate.repetition_penalty` must be > 0"),
    ("length_penalty", float("nan"), "`generate.length_penalty` must be a finite number"),
    ("end_sym", "", "`generate.end_sym` must be a non-empty string"),
    ("max_new_tokens", None, "`generate.max_new_tokens` must be an integer, got None"),
])
def test_config_generate_values_are_range_checked_where_the_config_is_loaded(capsys, tiny_dir, audio_dir,
                                                                            field, value, needle):
    config = _config_with(tiny_dir, **{field: value})
    with pytest.raises(SalmonnError, match=needle.replace("(", r"\(")):
        parse_config(yaml.safe_load(config.read_text()), config)
    code, _, err = cli(capsys, "generate", "--model", config, audio_dir / "tone_2s.wav")
    assert_one_line_error(code, err, str(config), needle)


def test_sampling_needs_a_positive_temperature(tiny_dir):
    config = _config_with(tiny_dir, do_sample=True, temperature=0.0)
    with pytest.raises(SalmonnError, match="temperature` must be > 0 with do_sample"):
        parse_config(yaml.safe_load(config.read_text()), config)
    config = _config_with(tiny_dir, do_sample=False, temperature=0.0)  # ignored by greedy/beam search: accepted
    assert parse_config(yaml.safe_load(config.read_text()), config).generate.temperature == 0.0


@pytest.mark.parametrize("field, value, needle", [("max_new_tokens", 0, "`generation.max_new_tokens` must be >= 1"),
                                                 ("num_beams", None, "`generation.num_beams` must be an integer"),
                                                 ("end_sym", "", "`generation.end_sym` must be a non-empty string")])
def test_a_hand_edited_bundle_manifest_is_range_checked_at_load(capsys, tmp_path, audio_dir, field, value, needle):
    generation = {"max_new_tokens": 8, "num_beams": 1, "min_length": 1, "repetition_penalty": 1.0,
                  "length_penalty": 1.0, "end_sym": "<|end_of_text|>", field: value}
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {}, "generation": generation}))
    code, _, err = cli(capsys, "run", "--engine", tmp_path, audio_dir / "tone_2s.wav")
    assert_one_line_error(code, err, str(tmp_path / "manifest.json"), needle)


def test_library_overrides_are_range_checked_too(tiny_model):
    for bad, needle in [({"max_new_tokens": 0}, "`max_new_tokens` must be >= 1, got 0"),
                        ({"num_beams": -1}, "`num_beams` must be >= 1"), ({"top_p": 2.0}, "`top_p` must be between")]:
        with pytest.raises(SalmonnError, match=needle):
            tiny_model.generation_kwargs(**bad)
    assert tiny_model.generation_kwargs(max_new_tokens=3, num_beams=None)["max_new_tokens"] == 3


# ------------------------------------------------------------------ run / generate stream their lines

def test_texts_stream_one_line_per_file_as_each_batch_finishes(capsys, tmp_path):
    from salmonn_export.cli.common import stream_texts

    files = [tmp_path / f"{i}.wav" for i in range(5)]
    seen_before_call = []

    def transcribe(batch):
        seen_before_call.append(capsys.readouterr().out.count("\n"))
        return [f"text {f.stem}" if f.stem != "3" else "bell\x07" for f in batch]

    stream_texts(files, 2, transcribe, False, {}, "run_seconds")
    assert seen_before_call == [0, 2, 2]  # lines of each batch were out before the next batch started
    assert capsys.readouterr().out.splitlines() == [f"{files[4]}\ttext 4"]
    stream_texts(files, 2, transcribe, True, {"task": "asr"}, "run_seconds")
    doc = json.loads(capsys.readouterr().out)
    assert doc["task"] == "asr" and doc["run_seconds"] >= 0
    assert [r["text"] for r in doc["results"]] == ["text 0", "text 1", "text 2", "bell\x07", "text 4"]


# ------------------------------------------------------------------ item 9: serve

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_BUNDLES = [
    (lambda d: d / "missing", "engine bundle does not exist"),
    (lambda d: d, "not an engine bundle (no manifest.json)"),
    (lambda d: (d / "manifest.json").write_text("{oops") and d, "manifest.json is not valid JSON"),
    (lambda d: (d / "manifest.json").write_text('{"format_version": 99}') and d, "bundle format 99"),
    (lambda d: (d / "manifest.json").write_text('{"format_version": 1, "files": {"decoder.onnx": "00"}}') and d,
     "bundle file `decoder.onnx` is missing"),
]


@pytest.mark.parametrize("make, needle", BAD_BUNDLES)
def test_serve_checks_the_bundle_before_announcing(capsys, tmp_path, make, needle):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    code, out, err = cli(capsys, "serve", "--engine", make(bundle), "--port", _free_port())
    assert_one_line_error(code, err, needle)
    assert "serving" not in out + err


def test_serve_on_a_bad_bundle_leaves_nothing_in_the_temp_folder(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{oops")
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "--engine", str(bundle), "--port",
                           str(_free_port())], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(temp), "COLUMNS": "200"})
    assert_one_line_error(proc.returncode, proc.stderr, "manifest.json is not valid JSON")
    assert "serving" not in proc.stderr + proc.stdout
    # `import onnxruntime` itself writes $TMPDIR/.ses (a session id file, not ours)
    assert [p.name for p in temp.iterdir() if p.name != ".ses"] == []


def test_serve_on_a_busy_port_is_one_line_before_announcing(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = cli(capsys, "serve", "--engine", tmp_path, "--port", port)
    assert_one_line_error(code, err, f"cannot listen on 127.0.0.1:{port}")
    assert "serving" not in out + err


def test_serve_app_startup_failure_removes_its_private_temp_folder(tmp_path, monkeypatch):
    import tempfile

    from fastapi.testclient import TestClient

    from salmonn_export.serve.app import ServeSettings, create_app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SalmonnError, match="engine bundle does not exist"):
        with TestClient(create_app(ServeSettings(engine=tmp_path / "nope"))):
            pass
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ item 10: unknown annotation tasks

def _annotation(tmp_path: Path, *tasks) -> Path:
    items = [{"testset_id": f"test{i:04d}", "path": f"a{i}.wav", **({"task": t} if t is not ...else {})}
             for i, t in enumerate(tasks)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"annotation": items}))
    return path


@pytest.mark.parametrize("bad, hint", [("ASR", "did you mean `asr`"), ("transcribe", None),
                                       ("aac", "did you mean `audiocaption_v2`"), ("Audiocaption_v2", "audiocaption_v2"),
                                       ("asr ", "did you mean `asr`"), ("", None)])
@pytest.mark.parametrize("task", ["asr", "aac", None])
def test_unknown_task_in_an_annotation_item_is_an_error_naming_it(tmp_path, bad, hint, task):
    path = _annotation(tmp_path, "asr", "audiocaption_v2", bad)
    with pytest.raises(SalmonnError, match=r"annotation item 2 \(`test0002`\): unknown task") as info:
        read_annotation(path, task)
    assert str(path) in str(info.value)
    if hint:
        assert hint in str(info.value)


def test_known_tasks_other_than_the_chosen_one_are_still_skipped(tmp_path):
    path = _annotation(tmp_path, "asr", ..., "QA", "audiocaption_v2", "asr_zh")
    assert [e.testset_id for e in read_annotation(path, "asr")] == ["test0000", "test0001"]
    assert [e.testset_id for e in read_annotation(path, "aac")] == ["test0003"]
    with pytest.raises(SalmonnError, match="unknown task `QA`"):
        read_annotation(path, "asr", known_tasks={"asr", "audiocaption_v2", "asr_zh"})


def test_eval_refuses_an_annotation_with_a_task_typo(capsys, tmp_path):
    path = _annotation(tmp_path, "asr", "ASR")
    code, _, err = cli(capsys, "eval", "--task", "asr", "--annotation", path, "--engine", tmp_path / "none",
                       "--out", tmp_path / "sub.csv")
    assert_one_line_error(code, err, str(path), "test0001", "unknown task `ASR`")
    assert not (tmp_path / "sub.csv").exists()


# ------------------------------------------------------------------ item 11: permissions

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o027, 0o077])
def test_atomic_outputs_get_umask_respecting_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            weights = tmp / "model.onnx.data"
            weights.write_bytes(b"w")
            os.chmod(weights, 0o600)  # as onnx writes external data
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "sub" / "run.sh", 0o700)
        report = atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == mode(out / "sub") == 0o777 & ~umask
    assert mode(out / "model.onnx.data") == mode(report) == 0o666 & ~umask
    assert mode(out / "sub" / "run.sh") == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.json"]


# ------------------------------------------------------------------ item 12: SIGTERM

def _sigterm_when(cmd: list, ready, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *map(str, cmd)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "the command never reached the point to interrupt"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_sigterm_before_a_command_starts_is_still_exit_143(capsys, monkeypatch):
    import salmonn_export.cli.common as common

    def stopped_by_a_scheduler():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises here

    monkeypatch.setattr(common, "_quiet_libraries", stopped_by_a_scheduler)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = cli(capsys, "recipes")
    assert code == 143 and err.strip() == "terminated"
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handler is removed again


def test_sigterm_during_build_cleans_up_like_ctrl_c(tmp_path, tiny_dir, audio_dir):
    out = tmp_path / "bundle"
    building = lambda: any(p.name.startswith(".bundle.building-") for p in tmp_path.iterdir())  # noqa: E731
    done = _sigterm_when(["build", "--recipe", "fp32", "--model", tiny_dir / "config.yaml", "--out", out,
                          "--calib", audio_dir], building)
    assert done.returncode == 143 and "terminated" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_eval_keeps_the_resumable_state_like_ctrl_c(tmp_path, tiny_dir, audio_dir):
    items = [{"testset_id": f"test{i:04d}", "path": str(audio_dir / "speech_a.wav"), "task": "asr",
              "text": "the quick brown fox"} for i in range(4000)]  # CI's fast cores finished 40 before the signal
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": items}))
    csv = tmp_path / "sub.csv"
    partial = tmp_path / "sub.csv.partial.jsonl"
    started = lambda: partial.is_file() and len(partial.read_text().splitlines()) >= 2  # noqa: E731
    done = _sigterm_when(["eval", "--task", "asr", "--model", tiny_dir / "config.yaml", "--annotation", ann,
                          "--out", csv], started)
    assert done.returncode == 143 and "terminated" in done.stderr, done.stderr
    assert f"finished items are kept in {csv}.partial.jsonl: rerun the same command to resume" in done.stderr
    assert "Traceback" not in done.stderr
    assert not csv.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann.json", "sub.csv.partial.jsonl"]
    kept = [json.loads(line) for line in partial.read_text().splitlines()]
    assert "meta" in kept[0] and all("text" in r for r in kept[1:])


def test_unknown_prompt_task_lists_each_known_task_once():
    from salmonn_export.tasks import templated_prompt

    prompts = {"asr": "a", "audiocaption_v2": "c", "QA": "q", "asr_de": "d"}
    with pytest.raises(SalmonnError, match="unknown task `foo`") as info:
        templated_prompt(prompts, "foo", "")
    known = str(info.value).split("known: ")[1].split(", ")
    assert known == ["asr", "aac", "QA", "asr_de"]


@pytest.mark.parametrize("args,needle", [
    (["verify"], "checking the engine bundle"),  # a progress line before the error
    (["run", "--engine"], "error: "),
    (["inspect"], "error: "),
])
def test_stderr_lines_do_not_wrap_in_a_pipe(tmp_path, args, needle):
    """Piped into a log (no terminal, no COLUMNS), rich would wrap at 80 columns: every stderr line whole."""
    long_path = tmp_path / ("d" * 150) / "bundle"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, str(long_path)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if needle in line]
    assert lines and all(str(long_path) in line for line in lines), proc.stderr


@pytest.mark.parametrize("command", [["generate", "--model", "{cfg}", "clip.wav"],
                                     ["build", "--model", "{cfg}", "--recipe", "w4a16", "--out", "{tmp}/bundle"],
                                     ["eval", "--model", "{cfg}", "--annotation", "{tmp}/ann.json", "--out",
                                      "{tmp}/sub.csv"]])
@pytest.mark.parametrize("config_kind", ["missing", "malformed", "folder"])
def test_a_bad_config_is_refused_before_torch_loads(tmp_path, command, config_kind):
    """A mistyped or broken --model config is one line, exit 2, in about a second: the commands that
    load a model check the config before importing torch (~6 s), and nothing is written."""
    cfg = tmp_path / "config.yaml"
    if config_kind == "malformed":
        cfg.write_text("model: [\n")
    elif config_kind == "folder":
        cfg.mkdir()
    (tmp_path / "ann.json").write_text('{"annotation": []}')
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in command]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_CLI, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1] == "no torch", proc.stderr
    assert len(lines) == 2 and lines[0].startswith(f"error: {cfg}"), proc.stderr
    expected = {"missing": "config file not found", "malformed": "not valid YAML at line 2",
                "folder": "is a folder; give the config YAML file"}[config_kind]
    assert expected in lines[0]
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "sub.csv").exists()


@pytest.mark.parametrize("command", ["generate", "build", "eval"])
@pytest.mark.parametrize("field, value, problem", [
    ("ckpt", "missing.pth", "file not found"),
    ("ckpt", "llm", "is a folder, not a file"),
    ("beats_path", "nosuch/beats.pt", "file not found"),
    ("llama_path", "Llama-3.2-3B-Instruct", "LLM folder not found (no model hub access"),
    ("whisper_path", "config.yaml", "Whisper folder is a file, not a folder"),
])
def test_a_file_the_config_names_is_checked_before_anything_loads(tmp_path, challenge_fixture, command, field, value,
                                                                   problem):
    """At real size Whisper and the LLM load for minutes: a mistyped `ckpt:` (or a hub id where a local
    folder must be) is one line naming the path and the field, before torch is imported."""
    model = tmp_path / "model"
    model.mkdir()
    for entry in challenge_fixture.iterdir():
        if entry.name != "config.yaml":
            (model / entry.name).symlink_to(entry)
    cfg = yaml.safe_load((challenge_fixture / "config.yaml").read_text())
    cfg["model"][field] = value
    (model / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = {"generate": ["generate", "--model", model / "config.yaml", challenge_fixture / "audio" / "a.wav"],
            "build": ["build", "--model", model / "config.yaml", "--out", tmp_path / "bundle"],
            "eval": ["eval", "--model", model / "config.yaml", "--out", tmp_path / "sub.csv"]}[command]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_CLI, *map(str, args)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1] == "no torch", proc.stderr
    assert len(lines) == 2 and lines[0].startswith(f"error: {model / value}: {problem}"), proc.stderr
    assert lines[0].endswith(f"`model.{field}` of {model / 'config.yaml'}")
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "sub.csv").exists()
