"""The Q-Former's windowing and query count are config values (issue 17): `second_per_window`,
`second_stride` and `num_speech_query_token` must be honoured by the reference, the exported
Q-Former graph, the bundle manifest and the runtime, not only at the challenge's 0.333333 s / 1.

Whisper gives 1500 frames per 30-s window (50 per second); a window is round(50·seconds) frames;
L = (1500 − window)//stride + 1 windows, each giving `num_speech_query_token` speech tokens.
0.1667 s → 8 frames → 187 windows; with 2 queries: 374 speech tokens (12.5 per second).
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from salmonn_export.export.onnx_export import export_component, session, validate_component
from salmonn_export.export.specs import qformer_spec
from salmonn_export.model.qformer import num_windows, window_size
from salmonn_export.model.salmonn import load_salmonn

SECONDS, QUERIES = 0.1667, 2
WINDOW = 8
SPEECH_TOKENS = 187 * QUERIES


@pytest.fixture(scope="module")
def fine_window_dir(tiny_dir, tmp_path_factory):
    """The tiny SALMONN with 8-frame windows and two (distinct) query tokens."""
    out = tmp_path_factory.mktemp("fine_window") / "salmonn"
    shutil.copytree(tiny_dir, out)
    ckpt = torch.load(out / "checkpoint_best.pth", weights_only=False)
    ckpt["model"]["speech_query_tokens"] = torch.randn(1, QUERIES, 768, generator=torch.Generator().manual_seed(5))
    torch.save(ckpt, out / "checkpoint_best.pth")
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["model"].update(second_per_window=SECONDS, second_stride=SECONDS, num_speech_query_token=QUERIES)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def fine_model(fine_window_dir):
    return load_salmonn(fine_window_dir / "config.yaml")


def test_window_arithmetic():
    assert window_size(0.333333) == 17 and num_windows(1500, 17, 17) == 88
    assert window_size(SECONDS) == WINDOW and num_windows(1500, WINDOW, WINDOW) * QUERIES == SPEECH_TOKENS


def test_reference_honours_window_stride_and_queries(fine_model):
    m = fine_model
    assert (m.window, m.stride) == (WINDOW, WINDOW)
    fused = torch.randn(2, 1500, m.speech_Qformer.bert.encoder.layer[0].crossattention.self.key.in_features,
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m.qformer_project(fused)
        # the spec's windowing written out: drop the frames past the last whole window, one row per window
        windows = fused[:, : 187 * WINDOW].reshape(2 * 187, WINDOW, fused.shape[-1])
        queries = m.speech_Qformer.bert(m.speech_query_tokens.expand(2 * 187, -1, -1), windows)
        expected = m.speech_llama_proj(queries).reshape(2, SPEECH_TOKENS, -1)
    assert out.shape == expected.shape == (2, SPEECH_TOKENS, m.speech_llama_proj.out_features)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, 0::2], out[:, 1::2])  # both queries carry their own output


def test_exported_qformer_graph_honours_window_and_queries(fine_model, tmp_path):
    spec = qformer_spec(fine_model)
    path = export_component(spec, tmp_path)
    assert validate_component(spec, path)["passed"]
    feeds = {name: arr.numpy() for name, arr in zip(spec.input_names, spec.fresh(torch.Generator().manual_seed(3))[1])}
    (speech,) = session(path).run(None, feeds)
    assert speech.shape[:2] == (feeds["whisper_hidden"].shape[0], SPEECH_TOKENS)


@pytest.mark.slow
def test_bundle_manifest_and_runtime_honour_window_and_queries(fine_window_dir, fine_model, audio_dir, tmp_path):
    from salmonn_export.audio import load_audio
    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe
    from salmonn_export.runtime.engine import Engine

    build_bundle(fine_window_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=tmp_path / "b"))
    engine = Engine(tmp_path / "b")
    wave = load_audio(next(p for p in sorted(audio_dir.glob("*.wav")) if p.name != "broken.wav"))
    ours = engine.encode_speech([wave])
    reference = fine_model.encode_speech(fine_model.make_batch([wave], ["asr"])).numpy()
    assert ours.shape == reference.shape == (1, SPEECH_TOKENS, reference.shape[-1])
    np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=1e-3)
    assert engine.manifest["qformer"] == {"window": WINDOW, "stride": WINDOW, "speech_tokens": SPEECH_TOKENS}


def test_demo_artifact_states_its_window_and_queries():
    import json

    from salmonn_export.errors import SalmonnError
    from salmonn_export.model.demo import demo_config

    plain = demo_config({}, Path("trained.safetensors"))
    assert plain["model"]["second_per_window"] == 0.333333 and plain["model"]["num_speech_query_token"] == 1
    chosen = {"model": {"second_per_window": SECONDS, "second_stride": SECONDS, "num_speech_query_token": QUERIES}}
    config = demo_config({"challenge_config": json.dumps(chosen)}, Path("trained.safetensors"))
    assert config["model"]["second_per_window"] == SECONDS and config["model"]["num_speech_query_token"] == QUERIES
    with pytest.raises(SalmonnError, match=r"trained.safetensors: .*model\.llama_path"):
        demo_config({"challenge_config": json.dumps({"model": {"llama_path": "x"}})}, Path("trained.safetensors"))
    with pytest.raises(SalmonnError, match="not JSON"):
        demo_config({"challenge_config": "{"}, Path("trained.safetensors"))
