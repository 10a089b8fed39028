"""The reference reproduces, exactly, what the challenge's own code generated from its checkpoint."""

import json

import pytest

from salmonn_export.audio import load_audio
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
            tol = 1e-9 if batch == 1 else 1e-6
            assert float(speech[j].double().sum()) == pytest.approx(expected["speech_embeds_sum"], rel=tol)
            assert float(speech[j].double().abs().mean()) == pytest.approx(expected["speech_embeds_abs_mean"], rel=tol)


def test_checkpoint_fully_consumed_including_beats_shared_bias(challenge_model):
    report = challenge_model.load_report
    # 70 trainable tensors + the BEATs layer-1 copy of the shared relative-position table
    assert report["loaded"] == 70
    assert report["beats_shared_bias"] == 1
