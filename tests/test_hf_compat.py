"""HF folders we write are read by the challenge's transformers 4.46.3 as by us (issue 15 item 2)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from salmonn_export.model.hf_compat import config_for_446, write_for_446
from salmonn_export.model.llm import load_base_llm, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def test_rope_parameters_become_446_top_level_keys():
    five = {"rope_parameters": {"rope_theta": 500000.0, **LLAMA3_ROPE}, "dtype": "float16", "vocab_size": 7}
    assert config_for_446(five) == {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "torch_dtype": "float16",
                                    "vocab_size": 7}
    plain = config_for_446({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}})
    assert plain == {"rope_theta": 10000.0, "rope_scaling": None}
    with pytest.raises(ValueError, match="flat dict"):
        config_for_446({"rope_parameters": {"full_attention": {"rope_theta": 1.0}}})


def test_tiny_folders_are_written_in_446_form(tiny_dir):
    config = json.loads((tiny_dir / "llm" / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"] is None
    assert "rope_parameters" not in config and config["torch_dtype"] == "float32" and "dtype" not in config
    tc = json.loads((tiny_dir / "llm" / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and "backend" not in tc
    assert tc["added_tokens_decoder"]["384"]["content"] == "<|begin_of_text|>"
    specials = json.loads((tiny_dir / "llm" / "special_tokens_map.json").read_text())
    assert specials == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    whisper = json.loads((tiny_dir / "whisper" / "config.json").read_text())
    assert whisper["torch_dtype"] == "float32" and "dtype" not in whisper


def test_446_form_reads_the_same_in_transformers_5(tmp_path):
    """The shipped demo LLM folder (as transformers 5 wrote it) and its 4.46 form: same ids, rope, logits."""
    from transformers import AutoConfig

    from salmonn_export.model.demo import DEMO_ARTIFACT

    converted = tmp_path / "llm"
    shutil.copytree(DEMO_ARTIFACT / "llm", converted)
    write_for_446(converted)
    assert json.loads((converted / "config.json").read_text())["rope_theta"] == 500000.0
    assert AutoConfig.from_pretrained(str(converted)).rope_parameters == \
        AutoConfig.from_pretrained(str(DEMO_ARTIFACT / "llm")).rope_parameters
    texts = ["USER: <Speech>", "</Speech> Recognize the speech.\nASSISTANT:", "a dog barks<|end_of_text|>"]
    shipped_tok, new_tok = load_tokenizer(DEMO_ARTIFACT / "llm"), load_tokenizer(converted)
    assert len(shipped_tok) == len(new_tok)
    assert [shipped_tok(t, add_special_tokens=False).input_ids for t in texts] == \
        [new_tok(t, add_special_tokens=False).input_ids for t in texts]
    ids = torch.tensor([new_tok("the quick brown fox").input_ids])
    with torch.no_grad():
        assert torch.equal(load_base_llm(DEMO_ARTIFACT / "llm")(input_ids=ids).logits,
                           load_base_llm(converted)(input_ids=ids).logits)


@pytest.mark.slow
def test_transformers_446_reads_our_folders_as_we_do(tmp_path):
    """benchmarks/compat/check_446.py in a side venv with transformers 4.46.3 (created if missing:
    pip install transformers==4.46.3 torch==2.13.0); the two controls must fail, our folders pass."""
    venv = Path(os.environ.get("SALMONN_COMPAT446_VENV", "/tmp/compat446"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compat" / "check_446.py"), "--venv", str(venv),
                           "--work", str(tmp_path / "work"), "--results", str(tmp_path / "compat_446")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "compat_446.json").read_text())
    by_name = {r["name"]: r for r in summary["folders"]}
    assert {"tiny", "tiny-llama32-tied", "demo"} <= set(by_name)
    for name in ("tiny", "tiny-llama32-tied", "demo"):
        assert by_name[name]["same"], (name, by_name[name]["checks"])
    assert by_name["tiny-llama32-tied"]["transformers_4_46"]["llm"]["config"]["rope_scaling"]["rope_type"] == "llama3"
    assert by_name["control-config-as-transformers5-writes"]["transformers_4_46"]["llm"]["config"]["rope_theta"] == 10000.0
    assert "TokenizersBackend" in by_name["control-tokenizer-as-transformers5-writes"]["error_446"]
