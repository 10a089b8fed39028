"""serve: a live server on loopback, the openai client, batching, limits, auth and backpressure."""

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from salmonn_export.export.build import BuildOptions, build_bundle
from salmonn_export.recipes import load_recipe
from salmonn_export.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("fastapi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "fp32"
    build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=out))
    return out


class Server:
    def __init__(self, bundle, *args, env=None, startup_s=60):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "--engine", str(bundle), "--port",
                                      str(self.port), *args], env={**os.environ, **(env or {})},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + startup_s
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).json()["status"] == "ok":
                    return
            except (httpx.HTTPError, ValueError):
                time.sleep(0.3)
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read())
        raise RuntimeError("server did not start")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(bundle):
    s = Server(bundle, "--max-batch", "4", "--max-wait-ms", "300", "--max-upload-mb", "1", "--max-audio-seconds", "20")
    yield s
    s.close()


def test_openai_client_gets_the_same_text_as_run(server, bundle, audio_dir):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with open(audio_dir / "speech_a.wav", "rb") as f:
        result = client.audio.transcriptions.create(model="salmonn", file=f)
    expected = Engine(bundle).transcribe([audio_dir / "speech_a.wav"], "asr")[0]
    assert result.text == expected
    with open(audio_dir / "tone_2s.wav", "rb") as f:
        text = client.audio.transcriptions.create(model="salmonn", file=f, response_format="text")
    assert isinstance(text, str)
    files = {"file": ("tone.wav", (audio_dir / "tone_2s.wav").read_bytes(), "audio/wav")}
    caption = httpx.post(server.url + "/v1/audio/captions", files=files, data={"model": "salmonn"}, timeout=60).json()
    assert caption["text"] == Engine(bundle).transcribe([audio_dir / "tone_2s.wav"], "aac")[0]


def test_concurrent_requests_are_batched_and_all_answered(server, bundle, audio_dir):
    names = ["speech_a.wav", "speech_b.wav", "tone_2s.wav", "chirp_2s.wav", "stereo_22k.wav", "short_0.4s.wav"]

    def send(name):
        files = {"file": (name, (audio_dir / name).read_bytes(), "audio/wav")}
        return httpx.post(server.url + "/v1/audio/transcriptions", files=files, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, names))
    assert [r.status_code for r in responses] == [200] * 6
    expected = Engine(bundle).transcribe([audio_dir / n for n in names], "asr")
    assert [r.json()["text"] for r in responses] == expected  # batched = one by one
    metrics = httpx.get(server.url + "/metrics").text
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("salmonn_batch_size_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("salmonn_batch_size_sum")))
    assert total / count > 1.0  # some batches held several requests
    assert "salmonn_ttft_seconds_bucket" in metrics and "salmonn_request_seconds_count" in metrics


def test_limits_and_bad_input(server, tmp_path):
    big = {"file": ("big.wav", b"\0" * (1024 * 1024 + 10), "audio/wav")}
    assert httpx.post(server.url + "/v1/audio/transcriptions", files=big, timeout=30).status_code == 413
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 25, dtype=np.int16), 16000, subtype="PCM_16")
    long = {"file": ("long.wav", (tmp_path / "long.wav").read_bytes(), "audio/wav")}
    assert httpx.post(server.url + "/v1/audio/transcriptions", files=long, timeout=30).status_code == 413
    junk = {"file": ("notes.txt", b"this is not audio at all", "text/plain")}
    r = httpx.post(server.url + "/v1/audio/transcriptions", files=junk, timeout=30)
    assert r.status_code == 400 and "unreadable audio" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/audio/transcriptions", files=junk, data={"response_format": "srt"}, timeout=30)
    assert r.status_code == 400
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still alive


def test_api_key_and_full_queue(bundle, audio_dir):
    s = Server(bundle, "--api-key-env", "SALMONN_TEST_KEY", "--max-batch", "1", "--max-queue", "1", "--max-wait-ms", "0",
               env={"SALMONN_TEST_KEY": "sekret"})
    try:
        files = {"file": ("a.wav", (audio_dir / "speech_a.wav").read_bytes(), "audio/wav")}
        url = s.url + "/v1/audio/transcriptions"
        assert httpx.post(url, files=files, timeout=30).status_code == 401
        assert httpx.post(url, files=files, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
        ok = httpx.post(url, files=files, headers={"Authorization": "Bearer sekret"}, timeout=60)
        assert ok.status_code == 200

        def send(_):
            return httpx.post(url, files=files, headers={"Authorization": "Bearer sekret"}, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = [r.status_code for r in pool.map(send, range(12))]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        metrics = httpx.get(s.url + "/metrics").text
        assert 'salmonn_errors_total{reason="queue_full"}' in metrics
    finally:
        s.close()


def test_non_finite_audio_is_400_and_dropped_audio_is_reported(bundle, tmp_path):
    nan = np.full(16000, 0.1, dtype=np.float32)
    nan[7] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    inf = np.full(22050, 0.1)
    inf[-1] = -np.inf
    sf.write(tmp_path / "inf.wav", inf, 22050, subtype="DOUBLE")
    sf.write(tmp_path / "long.wav", np.full(16000 * 32, 0.05), 16000, subtype="PCM_16")
    s = Server(bundle, "--max-audio-seconds", "60")
    try:
        url = s.url + "/v1/audio/transcriptions"
        for name in ("nan.wav", "inf.wav"):
            files = {"file": (name, (tmp_path / name).read_bytes(), "audio/wav")}
            r = httpx.post(url, files=files, timeout=60)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["message"].startswith(f"{name}: audio holds 1 non-finite samples (NaN or ±inf)")
        files = {"file": ("long.wav", (tmp_path / "long.wav").read_bytes(), "audio/wav")}
        r = httpx.post(url, files=files, data={"response_format": "verbose_json"}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["dropped_seconds"] == 2.0 and r.json()["duration"] == 32.0
        assert r.headers["X-Audio-Dropped-Seconds"] == "2.000"
        assert r.json()["text"] == Engine(bundle).transcribe([tmp_path / "long.wav"], "asr")[0]
        proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", "--engine", str(bundle), str(tmp_path / "nan.wav")],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nan.wav'}: audio holds 1 non-finite samples "
                                                     "(NaN or ±inf), the first at 0.000 s (sample 7); the model cannot use it"]
    finally:
        s.close()
