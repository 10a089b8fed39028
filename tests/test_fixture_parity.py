"""The reference (and the fp32 bundle) reproduce, exactly, what the challenge's own code generated from its checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from salmonn_export.audio import load_audio
from salmonn_export.errors import SalmonnError
from salmonn_export.model.salmonn import load_salmonn


@pytest.fixture(scope="module")
def challenge_model(challenge_fixture):
    return load_salmonn(challenge_fixture / "config.yaml")


@pytest.mark.parametrize("ref_file,batch,beams", [("ref_b4.json", 1, 4), ("ref_b1.json", 1, 1),
                                                  ("ref_b4_batch2.json", 2, 4)])
def test_texts_and_speech_embeddings_match_challenge_code(challenge_model, challenge_fixture, ref_file, batch, beams):
    ann = json.loads((challenge_fixture / "ann.json").read_text())["annotation"]
    ref = json.loads((challenge_fixture / ref_file).read_text())
    assert ref["beams"] == beams and ref["batch"] == batch
    for start in range(0, len(ann), batch):
        items = ann[start:start + batch]
        waves = [load_audio(challenge_fixture / a["path"]) for a in items]
        texts, speech = challenge_model.generate_batch(challenge_model.make_batch(waves, [a["task"] for a in items]),
                                                       num_beams=beams)
        for j, item in enumerate(items):
            expected = ref["items"][start + j]
            assert item["testset_id"] == expected["testset_id"]
            assert texts[j] == expected["text"], item["testset_id"]
            assert list(speech[j].shape) == expected["speech_embeds_shape"]
            # float32 kernels differ across CPUs (AVX2 / AVX-512 / AMX reduce in different orders): on an
            # AVX-512-FP16 machine the batch-1 sum is 3.6e-8 off the recording (1e-9 on earlier machines),
            # and forcing AVX2 or SSE kernels moves it as much. The texts must match exactly everywhere.
            tol = 1e-6
            assert float(speech[j].double().sum()) == pytest.approx(expected["speech_embeds_sum"], rel=tol)
            assert float(speech[j].double().abs().mean()) == pytest.approx(expected["speech_embeds_abs_mean"], rel=tol)


def test_checkpoint_fully_consumed_including_beats_shared_bias(challenge_model):
    report = challenge_model.load_report
    # 70 trainable tensors + the BEATs layer-1 copy of the shared relative-position table
    assert report["loaded"] == 70
    assert report["beats_shared_bias"] == 1


# ---------------------------------------------------------------- tied LLM (Llama-3.2 style)

TIED_HEAD_KEY = "llama_model.base_model.model.lm_head.weight"


@pytest.fixture(scope="module")
def tied_model(challenge_tied_fixture):
    return load_salmonn(challenge_tied_fixture / "config.yaml")


def _fixture_with_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A copy of a fixture folder (links to its files) whose checkpoint's `model` dict went through `edit`."""
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name not in ("config.yaml", "checkpoint_best.pth"):
            (dst / entry.name).symlink_to(entry)
    shutil.copy(src / "config.yaml", dst / "config.yaml")
    ckpt = torch.load(src / "checkpoint_best.pth", map_location="cpu", weights_only=True)
    edit(ckpt["model"])
    torch.save(ckpt, dst / "checkpoint_best.pth")
    return dst / "config.yaml"


@pytest.mark.parametrize("ref_file,beams", [("ref_b4.json", 4), ("ref_b1.json", 1)])
def test_tied_llm_texts_match_challenge_code(tied_model, challenge_tied_fixture, ref_file, beams):
    ann = json.loads((challenge_tied_fixture / "ann.json").read_text())["annotation"]
    ref = json.loads((challenge_tied_fixture / ref_file).read_text())
    assert ref["beams"] == beams and ref["batch"] == 1 and len(ref["items"]) == len(ann)
    for item, expected in zip(ann, ref["items"]):
        wave = load_audio(challenge_tied_fixture / item["path"])
        texts, speech = tied_model.generate_batch(tied_model.make_batch([wave], [item["task"]]), num_beams=beams)
        assert item["testset_id"] == expected["testset_id"]
        assert texts[0] == expected["text"], item["testset_id"]
        assert float(speech[0].double().sum()) == pytest.approx(expected["speech_embeds_sum"], rel=1e-6)  # as above


def test_tied_lm_head_consumed_with_its_pad_row(tied_model, challenge_tied_fixture, tmp_path):
    """The checkpoint's lm_head lands in the shared tensor, its [PAD] row included (spec 2.8).

    The fixture's own [PAD] row happens to be the exact mean of the others (our rule's value), so
    a copy with another [PAD] row shows that the checkpoint's row is the one taken.
    """
    assert tied_model.load_report["tied_lm_head"] == 1 and tied_model.load_report["loaded"] == 70
    lm = tied_model.causal_lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert tied_model.llama_tokenizer.pad_token_id == tied_model.base_vocab_size == 400
    pad_row = torch.linspace(-1.0, 1.0, 64)

    def new_pad_row(state):
        state[TIED_HEAD_KEY][400] = pad_row

    model = load_salmonn(_fixture_with_checkpoint(challenge_tied_fixture, tmp_path / "m", new_pad_row))
    weight = model.causal_lm.get_input_embeddings().weight
    assert model.causal_lm.get_output_embeddings().weight is weight
    assert torch.equal(weight[400], pad_row)
    assert torch.equal(weight[:400], lm.get_input_embeddings().weight[:400])


def test_tied_lm_head_disagreeing_with_base_names_the_key(challenge_tied_fixture, tmp_path):
    def corrupt(state):
        state[TIED_HEAD_KEY][7, 0] += 1.0

    config = _fixture_with_checkpoint(challenge_tied_fixture, tmp_path / "m", corrupt)
    with pytest.raises(SalmonnError, match=r"lm_head\.weight` disagrees .* 1 base row\(s\) \(first: row 7\)"):
        load_salmonn(config)


def test_lm_head_in_untied_checkpoint_is_still_refused(challenge_fixture, tmp_path):
    def add_head(state):
        state[TIED_HEAD_KEY] = torch.zeros(401, 64)

    config = _fixture_with_checkpoint(challenge_fixture, tmp_path / "m", add_head)
    with pytest.raises(SalmonnError, match="no place for: llama_model.base_model.model.lm_head.weight"):
        load_salmonn(config)


@pytest.fixture(scope="module")
def tied_fp32_bundle(challenge_tied_fixture, tmp_path_factory) -> Path:
    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe

    out = tmp_path_factory.mktemp("tied") / "fp32"
    build_bundle(challenge_tied_fixture / "config.yaml", load_recipe("fp32"), BuildOptions(out=out))
    return out


@pytest.mark.parametrize("ref_file,beams", [("ref_b4.json", 4), ("ref_b1.json", 1)])
def test_tied_fp32_bundle_reproduces_challenge_texts(tied_fp32_bundle, challenge_tied_fixture, ref_file, beams):
    from salmonn_export.runtime.engine import Engine

    ann = json.loads((challenge_tied_fixture / "ann.json").read_text())["annotation"]
    ref = json.loads((challenge_tied_fixture / ref_file).read_text())
    engine = Engine(tied_fp32_bundle)
    texts = engine.transcribe([challenge_tied_fixture / a["path"] for a in ann], [a["task"] for a in ann],
                              num_beams=beams)
    assert texts == [e["text"] for e in ref["items"]]
