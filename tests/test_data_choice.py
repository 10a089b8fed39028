"""`build` and `verify` data: the option given, else the config's own annotation, else (demo only) the
demo clips — never a silent fallback to the demo's clips for a user's model."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from salmonn_export.dataset import DEMO_ORIGIN, choose_data
from salmonn_export.errors import SalmonnError
from salmonn_export.model.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"})


def _config_with_datasets(src: Path, dst: Path, datasets: dict) -> Path:
    """A config beside `src`'s files (same folder layout via links) whose `datasets:` is replaced."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name != "config.yaml":
            (dst / entry.name).symlink_to(entry)
    raw = yaml.safe_load((src / "config.yaml").read_text())
    raw["datasets"] = datasets
    (dst / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dst / "config.yaml"


@pytest.fixture
def annotated(challenge_fixture, tmp_path):
    """The challenge fixture's folder with three annotation files to choose between."""
    ann = json.loads((challenge_fixture / "ann.json").read_text())
    folder = tmp_path / "data"
    folder.mkdir()
    for name, n in (("valid.json", 1), ("test.json", 2), ("train.json", 3)):
        (folder / name).write_text(json.dumps({"annotation": ann["annotation"][:n]}))
    return folder


@pytest.mark.parametrize("fields,chosen", [
    (("valid", "test", "train"), "valid"), (("test", "train"), "test"), (("train",), "train")])
def test_config_annotation_chosen_valid_then_test_then_train(challenge_fixture, annotated, tmp_path, fields, chosen):
    datasets = {"prefix": str(challenge_fixture), **{f"{f}_ann_path": str(annotated / f"{f}.json") for f in fields}}
    config = load_config(_config_with_datasets(challenge_fixture, tmp_path / "m", datasets))
    source = choose_data(config, None, "--calib", "calibration")
    assert source.path == annotated / f"{chosen}.json"
    assert source.origin == f"datasets.{chosen}_ann_path" and not source.is_demo
    assert source.audio_root == challenge_fixture
    record = source.record()
    assert record["sha256"] == hashlib.sha256((annotated / f"{chosen}.json").read_bytes()).hexdigest()
    assert record["source"] == str(annotated / f"{chosen}.json") and record["origin"] == source.origin


def test_given_path_wins_over_the_config(challenge_fixture, tmp_path):
    shutil.copy(challenge_fixture / "audio" / "a.wav", tmp_path / "a.wav")
    source = choose_data(load_config(challenge_fixture / "config.yaml"), tmp_path, "--data", "verification")
    assert source.path == tmp_path and source.origin == "--data" and source.audio_root is None


def test_no_annotation_and_no_option_is_an_error_naming_the_config(tiny_dir):
    config = load_config(tiny_dir / "config.yaml")
    with pytest.raises(SalmonnError, match="no calibration data: `datasets:` names no valid_ann_path.*pass --calib") as e:
        choose_data(config, None, "--calib", "calibration")
    assert str(tiny_dir / "config.yaml") in str(e.value)


def test_named_annotation_that_is_missing_is_an_error_not_a_fallback(challenge_fixture, annotated, tmp_path):
    datasets = {"valid_ann_path": str(tmp_path / "gone.json"), "test_ann_path": str(annotated / "test.json")}
    config = load_config(_config_with_datasets(challenge_fixture, tmp_path / "m", datasets))
    with pytest.raises(SalmonnError, match="datasets.valid_ann_path` names an annotation file that does not exist"):
        choose_data(config, None, "--calib", "calibration")


def test_demo_clips_only_for_the_demo_model(tiny_dir, tmp_path, monkeypatch):
    """A config at the demo model's place gets the demo clips; the same config elsewhere does not."""
    import salmonn_export.model.demo as demo

    fake_demo = tmp_path / "demo-model"
    shutil.copytree(tiny_dir, fake_demo)
    monkeypatch.setattr(demo, "demo_dir", lambda: fake_demo)
    source = choose_data(load_config(fake_demo / "config.yaml"), None, "--calib", "calibration")
    assert source.is_demo and source.origin == DEMO_ORIGIN and source.path == fake_demo / "audio"
    with pytest.raises(SalmonnError, match="no calibration data"):
        choose_data(load_config(tiny_dir / "config.yaml"), None, "--calib", "calibration")


def test_build_without_calib_for_a_model_without_data_stops_at_once(tiny_dir, tmp_path):
    proc = run_cli("build", "--recipe", "w4a16-rtn", "--model", tiny_dir / "config.yaml", "--out", tmp_path / "b")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "no calibration data" in lines[-1] and "--calib" in lines[-1]
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def fixture_bundles(challenge_fixture, tmp_path_factory):
    """fp32 and w4a16-rtn bundles of the challenge fixture, neither given calibration data."""
    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe

    root = tmp_path_factory.mktemp("data_choice")
    return {name: build_bundle(challenge_fixture / "config.yaml", load_recipe(name),
                               BuildOptions(out=root / name, calib_samples=3))["bundle"]
            for name in ("fp32", "w4a16-rtn")}


def test_build_calibrates_on_the_configs_annotation_and_records_it(fixture_bundles, challenge_fixture):
    manifest = json.loads((Path(fixture_bundles["w4a16-rtn"]) / "manifest.json").read_text())
    calibration = manifest["quantization"]["calibration"]
    assert calibration["origin"] == "datasets.test_ann_path"
    assert calibration["source"] == str(challenge_fixture / "ann.json")
    assert calibration["sha256"] == hashlib.sha256((challenge_fixture / "ann.json").read_bytes()).hexdigest()
    assert calibration["audio_root"] == str(challenge_fixture)
    assert calibration["sequences"] == 3


def test_verify_defaults_to_the_configs_annotation(fixture_bundles, challenge_fixture, tmp_path):
    proc = run_cli("verify", fixture_bundles["fp32"], "--report", tmp_path / "v.json", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["data"]["origin"] == "datasets.test_ann_path"
    assert report["data"]["source"] == str(challenge_fixture / "ann.json")
    assert len(report["rows"]) == 4 and report["end_to_end"]["exact_match"] == 1.0 and report["verdict"]["passed"]


def test_verify_without_data_for_a_model_without_data_is_an_error(fixture_bundles, tiny_dir):
    proc = run_cli("verify", fixture_bundles["fp32"], "--model", tiny_dir / "config.yaml")
    assert proc.returncode == 2
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and "no verification data" in last and "--data" in last


def test_audio_root_goes_with_a_given_annotation(challenge_fixture, tmp_path):
    config = load_config(challenge_fixture / "config.yaml")
    ann = tmp_path / "elsewhere.json"
    shutil.copy(challenge_fixture / "ann.json", ann)
    source = choose_data(config, ann, "--calib", "calibration", challenge_fixture)
    assert source.path == ann and source.audio_root == challenge_fixture
    assert source.record()["audio_root"] == str(challenge_fixture)
    with pytest.raises(SalmonnError, match="--audio-root goes with --data ANNOTATION.json"):
        choose_data(config, None, "--data", "verification", challenge_fixture)
    with pytest.raises(SalmonnError, match="--audio-root applies to an annotation .json, not to an audio folder"):
        choose_data(config, tmp_path, "--calib", "calibration", challenge_fixture)


def test_verify_reads_an_annotation_moved_away_from_its_audio_with_audio_root(fixture_bundles, challenge_fixture,
                                                                              tmp_path):
    """The challenge's annotations hold paths under `datasets.prefix`, not beside the .json."""
    ann = tmp_path / "moved" / "ann.json"
    ann.parent.mkdir()
    shutil.copy(challenge_fixture / "ann.json", ann)
    lost = run_cli("verify", fixture_bundles["fp32"], "--data", ann)
    assert lost.returncode == 2
    last = [line for line in lost.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and str(ann.parent / "audio") in last
    proc = run_cli("verify", fixture_bundles["fp32"], "--data", ann, "--audio-root", challenge_fixture, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["data"]["origin"] == "--data" and report["data"]["audio_root"] == str(challenge_fixture)
    assert len(report["rows"]) == 4 and report["end_to_end"]["exact_match"] == 1.0


def test_build_calib_annotation_with_audio_root(challenge_fixture, tmp_path):
    ann = tmp_path / "ann.json"
    shutil.copy(challenge_fixture / "ann.json", ann)
    proc = run_cli("build", "--recipe", "w4a16-rtn", "--model", challenge_fixture / "config.yaml", "--calib", ann,
                   "--audio-root", challenge_fixture, "--calib-samples", "2", "--out", tmp_path / "b", "--json",
                   "--no-cache")
    assert proc.returncode == 0, proc.stderr
    calibration = json.loads((tmp_path / "b" / "manifest.json").read_text())["quantization"]["calibration"]
    assert calibration["origin"] == "--calib" and calibration["audio_root"] == str(challenge_fixture)


@pytest.mark.parametrize("args,option", [
    (["build", "--recipe", "w4a16-rtn", "--calib", ""], "`--calib`"),
    (["verify", "--data", ""], "`--data`"),
    (["build", "--calib", "x.json", "--audio-root", ""], "`--audio-root`"),
    (["generate", ""], "an argument"),
])
def test_an_empty_argument_is_refused_before_anything_runs(tmp_path, args, option):
    """An unset shell variable gives "": Path("") is the current folder, which would be searched (.venv and all)."""
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {option} is an empty string (an unset shell variable?)"


def _moved_annotation(challenge_fixture, tmp_path, items=None) -> Path:
    ann = tmp_path / "moved" / "ann.json"
    ann.parent.mkdir(exist_ok=True)
    data = json.loads((challenge_fixture / "ann.json").read_text())
    if items is not None:
        data["annotation"] = items(data["annotation"])
    ann.write_text(json.dumps(data))
    return ann


@pytest.mark.parametrize("case,needle", [
    ("no root", "4 of 4 annotation items name audio that is not there, the first test0000"),
    ("missing root", "the audio root does not exist"),
    ("root is a file", "the audio root is not a folder"),
    ("one item missing", "1 of 4 annotation items name audio that is not there, the first test0003"),
    ("no such path", "--calib: no such file or folder"),
    ("not json", "--calib must be an audio folder or an annotation .json"),
])
def test_unusable_data_stops_before_the_model_loads(challenge_fixture, tmp_path, case, needle):
    """Checked in choose_data, before any load: every item, not only those a calibration sample would draw."""
    config = load_config(challenge_fixture / "config.yaml")
    ann = _moved_annotation(challenge_fixture, tmp_path)
    given, root = ann, challenge_fixture
    if case == "no root":
        root = None
    elif case == "missing root":
        root = tmp_path / "nope"
    elif case == "root is a file":
        root = challenge_fixture / "ann.json"
    elif case == "one item missing":
        given = _moved_annotation(challenge_fixture, tmp_path,
                                  lambda items: items[:3] + [{**items[3], "path": "audio/gone.wav"}])
    elif case == "no such path":
        given = tmp_path / "gone.json"
    elif case == "not json":
        given = tmp_path / "ann.txt"
        given.write_text("{}")
    with pytest.raises(SalmonnError, match=needle) as info:
        choose_data(config, given, "--calib", "calibration", root)
    if case == "no root":
        assert "give --audio-root ROOT" in str(info.value)
    upper = tmp_path / "moved" / "ANN.JSON"  # the extension in any case
    upper.write_text((challenge_fixture / "ann.json").read_text())
    assert choose_data(config, upper, "--calib", "calibration", challenge_fixture).path == upper


def test_a_relative_audio_root_is_recorded_absolute(challenge_fixture, tmp_path, monkeypatch):
    monkeypatch.chdir(challenge_fixture.parent)
    ann = _moved_annotation(challenge_fixture, tmp_path)
    source = choose_data(load_config(challenge_fixture / "config.yaml"), ann, "--data", "verification",
                         Path(challenge_fixture.name))
    assert source.record()["audio_root"] == str(challenge_fixture)


def test_verify_warns_when_the_checkpoint_is_not_the_bundles(fixture_bundles, challenge_tied_fixture):
    """The tied and untied fixtures have byte-identical config.yaml files: only the checkpoint tells them
    apart, and verify against the wrong one would fail every check with no hint why."""
    proc = run_cli("verify", fixture_bundles["fp32"], "--model", challenge_tied_fixture / "config.yaml", "--json")
    warning = [line for line in proc.stderr.splitlines() if "is not the ckpt file the bundle was built from" in line]
    assert len(warning) == 1 and str(challenge_tied_fixture / "checkpoint_best.pth") in warning[0]
    assert "verify would compare the engine with another model" in warning[0]


def test_build_warns_on_unused_or_short_calibration_data(challenge_fixture, tmp_path):
    ann = _moved_annotation(challenge_fixture, tmp_path)
    fp32 = run_cli("build", "--recipe", "fp32", "--model", challenge_fixture / "config.yaml", "--calib", ann,
                   "--audio-root", challenge_fixture, "--out", tmp_path / "fp32", "--json")
    assert fp32.returncode == 0, fp32.stderr
    note = "this recipe does not calibrate (no quantized weights): --calib/--audio-root are not used"
    assert f"warning: {note}" in fp32.stderr and note in json.loads(fp32.stdout)["warnings"]
    rtn = run_cli("build", "--recipe", "w4a16-rtn", "--model", challenge_fixture / "config.yaml", "--calib", ann,
                  "--audio-root", challenge_fixture, "--calib-samples", "100", "--out", tmp_path / "rtn", "--json",
                  "--no-cache")
    assert rtn.returncode == 0, rtn.stderr
    short = "calibration asked for 100 sequences, the data gave 4 (4 items)"
    assert short in rtn.stderr and any(short in w for w in json.loads(rtn.stdout)["warnings"])
