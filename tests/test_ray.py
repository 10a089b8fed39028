"""Scale-out on a local Ray instance: `eval --ray` writes the identical CSV; Ray Serve answers like `run`."""

import json

import httpx
import pytest

pytest.importorskip("ray")

from test_cli import run  # noqa: E402
from test_serve import Server  # noqa: E402

from salmonn_export.export.build import BuildOptions, build_bundle  # noqa: E402
from salmonn_export.recipes import load_recipe  # noqa: E402
from salmonn_export.runtime.engine import Engine  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray") / "fp32"
    build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=out))
    return out


def test_eval_on_ray_writes_the_identical_csv(bundle, audio_dir, tmp_path):
    items = [{"testset_id": f"test{i:04d}", "path": str(audio_dir / n), "task": "asr", "text": "a b"}
             for i, n in enumerate(["speech_a.wav", "speech_b.wav", "tone_2s.wav", "chirp_2s.wav", "stereo_22k.wav"])]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotation": items}))
    common = ["eval", "--task", "asr", "--engine", bundle, "--annotation", ann, "--batch-size", "2"]
    run(*common, "--out", tmp_path / "local.csv")
    run(*common, "--out", tmp_path / "ray.csv", "--ray", "--ray-actors", "2")
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    assert not (tmp_path / "ray.csv.partial.jsonl").exists()


def test_ray_serve_deployment_answers_like_run(bundle, audio_dir):
    server = Server(bundle, "--ray", "--replicas", "1", startup_s=180)
    try:
        files = {"file": ("a.wav", (audio_dir / "speech_a.wav").read_bytes(), "audio/wav")}
        r = httpx.post(server.url + "/v1/audio/transcriptions", files=files, timeout=120)
        assert r.status_code == 200
        assert r.json()["text"] == Engine(bundle).transcribe([audio_dir / "speech_a.wav"], "asr")[0]
    finally:
        server.close()
