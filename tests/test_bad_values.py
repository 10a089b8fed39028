"""Bad values found by QA (F5-F7): huge counts, unknown devices and huge-but-finite audio samples are
each one line `error: ...` naming the option/field/file, exit 2, no traceback; serve answers 400."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import yaml
from test_cli_conventions import assert_one_line_error, cli  # tests/ is on sys.path

from salmonn_export.audio import MAX_ABS_SAMPLE, load_clip, load_clip_bytes
from salmonn_export.cli.common import device_check
from salmonn_export.errors import SalmonnError
from salmonn_export.generation_rules import MAX_NEW_TOKENS_LIMIT, NUM_BEAMS_LIMIT, check_generate
from salmonn_export.model.config import parse_config

HUGE = "99999999999999999999999"


@pytest.fixture
def tone(tmp_path):
    path = tmp_path / "tone.wav"
    sf.write(path, 0.1 * np.sin(np.arange(16000) / 10), 16000)
    return path


# ------------------------------------------------------------------ F5: upper bounds of counts

@pytest.mark.parametrize("args, needle", [
    (["run", "--max-new-tokens", HUGE], f"'--max-new-tokens': must be <= {MAX_NEW_TOKENS_LIMIT} (allowed: 1 to"),
    (["run", "--num-beams", HUGE], f"'--num-beams': must be <= {NUM_BEAMS_LIMIT}"),
    (["run", "--num-beams", str(NUM_BEAMS_LIMIT + 1)], f"'--num-beams': must be <= {NUM_BEAMS_LIMIT}"),
    (["run", "--batch-size", HUGE], "'--batch-size': must be <="),
    (["generate", "--max-new-tokens", HUGE], f"'--max-new-tokens': must be <= {MAX_NEW_TOKENS_LIMIT}"),
    (["generate", "--num-beams", HUGE], "'--num-beams': must be <="),
    (["generate", "--batch-size", HUGE], "'--batch-size': must be <="),
    (["verify", "--num-beams", HUGE], "'--num-beams': must be <="),
    (["bench", "--iters", HUGE], "'--iters': must be <="),
    (["bench", "--warmup", HUGE], "'--warmup': must be <="),
    (["bench", "--stage-iters", HUGE], "'--stage-iters': must be <="),
    (["bench", "--new-tokens", HUGE], "'--new-tokens': must be <="),
    (["bench", "--iters", "1e23"], "'--iters'"),
    (["eval", "--limit", HUGE], "'--limit': must be <="),
    (["eval", "--batch-size", HUGE], "'--batch-size': must be <="),
    (["eval", "--ray-actors", HUGE], "'--ray-actors': must be <="),
    (["serve", "--max-batch", HUGE], "'--max-batch': must be <="),
    (["serve", "--max-queue", HUGE], "'--max-queue': must be <="),
    (["serve", "--replicas", HUGE], "'--replicas': must be <="),
    (["build", "--calib-samples", HUGE], "'--calib-samples': must be <="),
])
def test_huge_counts_are_one_line_errors(capsys, args, needle):
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, needle)


@pytest.mark.parametrize("shard, needle", [("0/1e23", "--shard must look like I/N"),
                                           (f"0/{HUGE}", "--shard 0/99999999999999999999999: N must be <= 100000")])
def test_huge_shard_counts_are_refused(capsys, shard, needle):
    code, _, err = cli(capsys, "eval", "--shard", shard)
    assert_one_line_error(code, err, needle)


def test_the_limits_themselves_are_accepted():
    check_generate({"max_new_tokens": MAX_NEW_TOKENS_LIMIT, "num_beams": NUM_BEAMS_LIMIT,
                    "min_length": MAX_NEW_TOKENS_LIMIT})
    from salmonn_export.harness.evaluate import parse_shard

    assert parse_shard("99999/100000") == (99999, 100000)


@pytest.mark.parametrize("field, value, needle", [
    ("max_new_tokens", 10**23, f"`generate.max_new_tokens` must be between 1 and {MAX_NEW_TOKENS_LIMIT}"),
    ("max_new_tokens", MAX_NEW_TOKENS_LIMIT + 1, "`generate.max_new_tokens` must be between 1 and"),
    ("num_beams", 10**23, f"`generate.num_beams` must be between 1 and {NUM_BEAMS_LIMIT}"),
    ("min_length", 10**23, f"`generate.min_length` must be between 0 and {MAX_NEW_TOKENS_LIMIT}"),
])
def test_config_generate_values_have_upper_bounds(tmp_path, field, value, needle):
    from dataclasses import asdict

    from salmonn_export.model.config import GenerateConfig

    values = asdict(GenerateConfig())
    with pytest.raises(SalmonnError, match=needle):
        check_generate({**values, field: value}, tmp_path / "c.yaml", prefix="generate.")


def test_config_file_with_a_huge_value_is_one_line_error(capsys, tiny_dir, tone):
    raw = yaml.safe_load((tiny_dir / "config.yaml").read_text())
    raw["generate"]["max_new_tokens"] = 10**23
    config = tiny_dir / "bad-huge-max-new-tokens.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(SalmonnError, match="`generate.max_new_tokens` must be between 1 and 4096"):
        parse_config(yaml.safe_load(config.read_text()), config)
    code, _, err = cli(capsys, "generate", "--model", config, tone)
    assert_one_line_error(code, err, str(config), "`generate.max_new_tokens` must be between 1 and 4096")


@pytest.mark.parametrize("field, value", [("max_new_tokens", 10**23), ("num_beams", 10**23)])
def test_manifest_with_a_huge_value_is_one_line_error(capsys, tmp_path, tone, field, value):
    generation = {"max_new_tokens": 8, "num_beams": 1, "min_length": 1, "repetition_penalty": 1.0,
                  "length_penalty": 1.0, "end_sym": "<|end_of_text|>", field: value}
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "files": {}, "generation": generation}))
    code, _, err = cli(capsys, "run", "--engine", tmp_path, tone)
    assert_one_line_error(code, err, str(tmp_path / "manifest.json"), f"`generation.{field}` must be between 1 and")


def test_per_call_overrides_have_upper_bounds():
    for bad, needle in [({"max_new_tokens": 10**23}, "`max_new_tokens` must be between 1 and 4096"),
                        ({"num_beams": 65}, "`num_beams` must be between 1 and 64")]:
        with pytest.raises(SalmonnError, match=needle):
            check_generate(bad, overrides=True)


# ------------------------------------------------------------------ F6: --device in one place

@pytest.mark.parametrize("command", ["generate", "run", "eval", "serve", "bench"])
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cuda:", "CPU"])
def test_unknown_devices_are_one_line_errors(capsys, command, device):
    code, _, err = cli(capsys, command, "--device", device)
    assert_one_line_error(code, err, "'--device'", f"unknown device {device!r}")


def test_device_choices():
    torch_devices = device_check(("cpu", "cuda"))
    for ok in ("cpu", "cuda", "cuda:0", "cuda:3"):
        assert torch_devices(ok) == ok
    engine_devices = device_check(("cpu", "cuda", "tensorrt", "auto"))
    for ok in ("tensorrt", "auto", "cuda:1"):
        assert engine_devices(ok) == ok
    bench_devices = device_check(("cpu", "cuda"), cuda_index=False)
    import typer

    for bad in ("cuda:0", "tpu", "cuda:-1", "cuda:٣"):
        with pytest.raises(typer.BadParameter):
            bench_devices(bad)
    with pytest.raises(typer.BadParameter):
        torch_devices("cuda:99999999999999999999999")


# ------------------------------------------------------------------ F7: huge finite samples

@pytest.mark.parametrize("value, subtype", [(1e20, "FLOAT"), (3e38, "FLOAT"), (-1e30, "DOUBLE"),
                                            (MAX_ABS_SAMPLE * 2, "DOUBLE")])
def test_huge_finite_samples_are_refused_naming_file_time_sample_and_value(tmp_path, value, subtype):
    wave = np.full(16000, 0.1)
    wave[8000] = value
    path = tmp_path / "loud.wav"
    sf.write(path, wave, 16000, subtype=subtype)
    with pytest.raises(SalmonnError) as info:
        load_clip(path)
    message = str(info.value)
    assert message.startswith(f"{path}: audio holds 1 samples of magnitude above 4.295e+09")
    assert "0.500 s (sample 8000)" in message and f"{np.float32(value) if subtype == 'FLOAT' else value:.4g}" in message
    with pytest.raises(SalmonnError, match=r"^up\.wav: audio holds 1 samples of magnitude above"):  # serve's path
        load_clip_bytes(path.read_bytes(), "up.wav")


def test_int16_and_int32_scale_floats_still_load(tmp_path):
    for scale in (32767.0, 2.0**31 - 1):
        path = tmp_path / f"scaled-{int(scale)}.wav"
        wave = scale * np.sin(np.arange(16000) / 7)
        sf.write(path, wave, 16000, subtype="DOUBLE")
        assert np.abs(load_clip(path).wave).max() > scale / 2


def test_features_at_the_limit_are_finite():
    from salmonn_export.runtime.features import beats_inputs, whisper_log_mel

    wave = MAX_ABS_SAMPLE * np.sign(np.sin(np.arange(32000) / 3.0))
    rng = np.random.default_rng(0)
    mel = whisper_log_mel(wave, rng.random((201, 80)))
    fbank, _ = beats_inputs([wave], rng.random((128, 257)), np.ones(400))
    assert np.isfinite(mel).all() and np.isfinite(fbank).all()
    # the reference's torch features run in float32: the power spectrum stays finite there too
    spec = np.fft.rfft(wave[:400].astype(np.float32) * 4 * 2**15, n=512).astype(np.complex64)
    assert np.isfinite((np.abs(spec) ** 2).astype(np.float32)).all()


def test_cli_refuses_huge_samples_in_one_line(capsys, tiny_dir, tmp_path):
    wave = np.full(16000, 0.1, dtype=np.float32)
    wave[3] = 1e20
    path = tmp_path / "loud.wav"
    sf.write(path, wave, 16000, subtype="FLOAT")
    code, out, err = cli(capsys, "generate", "--model", tiny_dir / "config.yaml", path)
    assert_one_line_error(code, err, str(path), "sample 3", "1e+20")
    assert out == ""
