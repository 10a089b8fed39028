"""Loading is strict: every tensor lands, nothing is missing, shapes match, bad files say so."""

import re
import shutil
from fractions import Fraction

import pytest
import torch

from salmonn_export.errors import SalmonnError
from salmonn_export.model.beats import load_beats
from salmonn_export.model.salmonn import load_salmonn


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_dir, dst)
    return dst


def _edit_ckpt(folder, fn):
    path = folder / "checkpoint_best.pth"
    ckpt = torch.load(path, weights_only=True)
    fn(ckpt["model"])
    torch.save(ckpt, path)


def test_tiny_round_trips_through_real_formats(tiny_model, tiny_dir):
    state = torch.load(tiny_dir / "checkpoint_best.pth", weights_only=True)["model"]
    own = tiny_model.state_dict()
    assert set(state) == set(tiny_model.trainable_keys())
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    beats_file = torch.load(tiny_dir / "beats.pt", weights_only=True)
    beats_own = tiny_model.beats.state_dict()
    assert set(beats_file["model"]) == set(beats_own)
    assert all(torch.equal(beats_own[k], v) for k, v in beats_file["model"].items())


def test_missing_key_is_named(tiny_copy):
    _edit_ckpt(tiny_copy, lambda m: m.pop("speech_llama_proj.bias"))
    with pytest.raises(SalmonnError, match="lacks trained tensors: speech_llama_proj.bias"):
        load_salmonn(tiny_copy / "config.yaml")


def test_extra_key_is_named(tiny_copy):
    _edit_ckpt(tiny_copy, lambda m: m.__setitem__("speech_Qformer.cls.predictions.bias", torch.zeros(3)))
    with pytest.raises(SalmonnError, match="no place for: speech_Qformer.cls.predictions.bias"):
        load_salmonn(tiny_copy / "config.yaml")


def test_wrong_prefix_is_not_silently_skipped(tiny_copy):
    def rename(m):
        for k in [k for k in m if k.startswith("llama_model.")]:
            m[k.replace("llama_model.base_model.model.", "llama_model.")] = m.pop(k)

    _edit_ckpt(tiny_copy, rename)
    with pytest.raises(SalmonnError, match="no place for"):
        load_salmonn(tiny_copy / "config.yaml")


def test_wrong_shape_is_named(tiny_copy):
    _edit_ckpt(tiny_copy, lambda m: m.__setitem__("speech_llama_proj.weight", torch.zeros(32, 768)))
    with pytest.raises(SalmonnError, match=r"speech_llama_proj.weight \(32, 768\)"):
        load_salmonn(tiny_copy / "config.yaml")


NOT_TORCH = r"not a torch checkpoint \(a zip/pickle file written by torch.save\)$"
BAD_CHECKPOINTS = {  # what is written where a checkpoint belongs -> the end of the message
    "yaml": (lambda real: b"model:\n  ckpt: checkpoint_best.pth\n", r": a text file, " + NOT_TORCH),
    "json": (lambda real: b'{"model": {"ckpt": "checkpoint_best.pth"}}', r": a text file, " + NOT_TORCH),
    "empty": (lambda real: b"", r": an empty file, " + NOT_TORCH),
    "truncated": (lambda real: real[: len(real) // 2], r": truncated or damaged \(its zip archive is incomplete\)$"),
    "binary": (lambda real: bytes(range(256)), r": " + NOT_TORCH),
}


def _check_bad_checkpoint(path, kind, what, load):
    """One complete line naming the file and what it is, never torch's weights_only advice."""
    make, ending = BAD_CHECKPOINTS[kind]
    path.write_bytes(make(path.read_bytes()))
    with pytest.raises(SalmonnError) as err:
        load()
    message = str(err.value)
    assert message.startswith(f"{path}: not a readable {what}: "), message
    assert re.search(ending, message), message
    assert "\n" not in message and "weights_only" not in message and "PyTorch" not in message


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_training_checkpoint_says_what_the_file_is(tiny_copy, kind):
    _check_bad_checkpoint(tiny_copy / "checkpoint_best.pth", kind, "training checkpoint",
                          lambda: load_salmonn(tiny_copy / "config.yaml"))


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_beats_checkpoint_says_what_the_file_is(tiny_copy, kind):
    _check_bad_checkpoint(tiny_copy / "beats.pt", kind, "BEATs checkpoint", lambda: load_beats(tiny_copy / "beats.pt"))


def test_checkpoint_with_python_objects_names_the_type(tiny_copy):
    """A real torch.save file that weights_only loading refuses: the offending type is named."""
    torch.save({"cfg": Fraction(1, 3), "model": {}}, tiny_copy / "beats.pt")
    with pytest.raises(SalmonnError, match=r"beats.pt: not a readable BEATs checkpoint: it holds a Python object "
                                           r"\(fractions.Fraction\) that torch.load\(weights_only=True\) refuses$"):
        load_beats(tiny_copy / "beats.pt")


def test_non_checkpoint_pth(tiny_copy):
    torch.save({"weights": torch.zeros(2)}, tiny_copy / "checkpoint_best.pth")
    with pytest.raises(SalmonnError, match="no `model` state dict"):
        load_salmonn(tiny_copy / "config.yaml")


def test_missing_whisper_folder(tiny_copy):
    shutil.rmtree(tiny_copy / "whisper")
    with pytest.raises(SalmonnError, match="whisper"):
        load_salmonn(tiny_copy / "config.yaml")


def test_beats_file_without_cfg(tiny_copy):
    torch.save({"model": {}}, tiny_copy / "beats.pt")
    with pytest.raises(SalmonnError, match="not a BEATs checkpoint"):
        load_beats(tiny_copy / "beats.pt")


def test_config_that_does_not_match_weights(tiny_copy):
    """A BEATs file of another width than the Q-Former was trained for: shape error, named."""
    ckpt = torch.load(tiny_copy / "beats.pt", weights_only=True)
    ckpt["cfg"]["encoder_embed_dim"] = 32
    torch.save(ckpt, tiny_copy / "beats.pt")
    with pytest.raises(SalmonnError, match="BEATs checkpoint does not match its config"):
        load_salmonn(tiny_copy / "config.yaml")


def test_pad_token_added_and_embedding_rows_are_the_mean(tiny_model, tiny_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "llm")
    tok = tiny_model.llama_tokenizer
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == base.config.vocab_size
    emb = tiny_model.causal_lm.get_input_embeddings().weight
    head = tiny_model.causal_lm.get_output_embeddings().weight
    assert emb.shape[0] == len(tok) == base.config.vocab_size + 1
    assert torch.equal(emb[-1], base.get_input_embeddings().weight.mean(0))
    assert torch.equal(head[-1], base.get_output_embeddings().weight.mean(0))


@pytest.mark.parametrize("kind", ["whisper folder", "gpt2", "no model_type"])
def test_llm_folder_that_is_not_a_llama_is_named(tiny_copy, kind):
    """transformers would load any causal LM (a Whisper folder as llama_path loads as
    WhisperForCausalLM) and peft would fail later with a traceback: the config is checked first."""
    import json

    path = tiny_copy / "llm" / "config.json"
    config = json.loads(path.read_text())
    if kind == "whisper folder":
        config = json.loads((tiny_copy / "whisper" / "config.json").read_text())
    elif kind == "gpt2":
        config["model_type"] = "gpt2"
    else:
        del config["model_type"]
    path.write_text(json.dumps(config))
    found = {"whisper folder": "a `whisper` model", "gpt2": "a `gpt2` model", "no model_type": "no `model_type`"}[kind]
    with pytest.raises(SalmonnError, match=re.escape(f"LLM config names {found}, not `llama`")) as err:
        load_salmonn(tiny_copy / "config.yaml")
    assert str(path) in str(err.value)
