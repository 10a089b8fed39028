"""Loading is strict: every tensor lands, nothing is missing, shapes match, bad files say so."""

import shutil

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


def test_truncated_pth(tiny_copy):
    path = tiny_copy / "checkpoint_best.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SalmonnError, match="checkpoint_best.pth: not a readable training checkpoint"):
        load_salmonn(tiny_copy / "config.yaml")


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
