"""Config parsing: every spec field, warnings for unknown ones, errors naming missing ones."""

import pytest
import yaml

from salmonn_export.errors import SalmonnError
from salmonn_export.model.config import load_config
from salmonn_export.model.tiny import challenge_config


def write(tmp_path, data, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_challenge_fixture_config_parses_with_low_resource_warning(challenge_fixture):
    cfg = load_config(challenge_fixture / "config.yaml")
    assert cfg.model.prompt_template == "USER: {}\nASSISTANT:"
    assert cfg.generate.max_new_tokens == 12 and cfg.generate.num_beams == 4
    assert cfg.model.low_resource is False
    assert any("Low_resource" in w for w in cfg.warnings)
    assert cfg.resolve(cfg.model.llama_path) == challenge_fixture / "llm"


def test_missing_required_field_is_named(tmp_path):
    data = challenge_config()
    del data["model"]["whisper_path"]
    with pytest.raises(SalmonnError, match=r"model\.whisper_path"):
        load_config(write(tmp_path, data))


def test_missing_model_section(tmp_path):
    with pytest.raises(SalmonnError, match="model:"):
        load_config(write(tmp_path, {"generate": {"num_beams": 1}}))


def test_unknown_fields_are_warnings(tmp_path):
    data = challenge_config()
    data["model"]["qformer_magic"] = 3
    data["extra_section"] = {}
    data["run"]["optims"] = {"init_lr": 1e-4, "bogus": 1}
    cfg = load_config(write(tmp_path, data))
    joined = "\n".join(cfg.warnings)
    assert "model.qformer_magic" in joined and "extra_section" in joined and "run.optims.bogus" in joined


def test_wrong_type_is_an_error_naming_the_field(tmp_path):
    data = challenge_config()
    data["generate"]["num_beams"] = "four"
    with pytest.raises(SalmonnError, match=r"generate\.num_beams"):
        load_config(write(tmp_path, data))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(SalmonnError, match="not valid YAML at line 2, column"):
        load_config(write(tmp_path, "model: [unclosed\n  - x: :"))
    with pytest.raises(SalmonnError, match=r"not valid YAML at line 3, column 10 \(mapping values"):
        load_config(write(tmp_path, "model:\n  lora: true\n  ckpt: a: b\n"))
    with pytest.raises(SalmonnError, match="`model:` must be a mapping of fields, not a list"):
        load_config(write(tmp_path, "model: [1, 2]\n"))
    with pytest.raises(SalmonnError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_relative_paths_resolve_beside_the_config_and_overrides_apply(tmp_path):
    sub = tmp_path / "models"
    sub.mkdir()
    (sub / "llm").mkdir()
    cfg = load_config(write(sub, challenge_config()), overrides=["generate.num_beams=2", "model.ckpt=other.pth"])
    assert cfg.resolve(cfg.model.llama_path) == sub / "llm"
    assert cfg.generate.num_beams == 2 and cfg.model.ckpt == "other.pth"
    assert cfg.model.end_sym == "<|end_of_text|>"


def test_code_defaults_match_the_spec(tmp_path):
    cfg = load_config(write(tmp_path, {"model": {"llama_path": "a", "whisper_path": "b"}}))
    g, m = cfg.generate, cfg.model
    assert (g.max_new_tokens, g.num_beams, g.min_length, g.top_p, g.length_penalty) == (200, 4, 1, 0.9, 1.0)
    assert (m.lora_rank, m.lora_alpha, m.lora_dropout, m.max_txt_len, m.end_sym) == (8, 32, 0.1, 128, "</s>")
    assert m.second_per_window == pytest.approx(0.333333) and m.num_speech_query_token == 1


@pytest.mark.parametrize("field,value,message", [
    ("second_per_window", 0, r"second_per_window: 0.0` must give 1 to 1500 Whisper frames"),
    ("second_per_window", -0.1, r"second_per_window: -0.1` must give 1 to 1500"),
    ("second_per_window", 40, r"second_per_window: 40.0` must give 1 to 1500"),
    ("second_stride", 0.005, r"second_stride: 0.005` must give 1 to 1500"),
    ("num_speech_query_token", 0, r"num_speech_query_token` must be >= 1, got 0"),
    ("window_level_Qformer", False, r"window_level_Qformer: false"),
])
def test_qformer_windowing_out_of_range_is_an_error_naming_the_field(tmp_path, field, value, message):
    """Window settings a user may mistype: one error naming the field (they crashed inside unfold/reshape)."""
    data = challenge_config()
    data["model"][field] = value
    with pytest.raises(SalmonnError, match=message):
        load_config(write(tmp_path, data))


def test_sampling_config_warns_that_engines_decode_deterministically(tmp_path):
    data = challenge_config()
    data.setdefault("generate", {})["do_sample"] = True
    assert any("do_sample: true" in w and "deterministically" in w for w in load_config(write(tmp_path, data)).warnings)
