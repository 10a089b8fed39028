"""bench: the protocol's bookkeeping (warm-up excluded, counts, key names), ratios from one run."""

import json

import numpy as np

from salmonn_export.harness.bench import CHALLENGE_KEYS, System, peak_rss_gb, ratios, run_protocol


def _fake(name, ttft_s, tpot_s, calls):
    import time

    def ttft(_w):
        calls.append((name, "ttft"))
        time.sleep(ttft_s)
        return None

    def tpot(_state):
        calls.append((name, "tpot"))
        time.sleep(tpot_s)

    return System(name, ttft, tpot, {}, 1, 1, 1)


def test_protocol_interleaves_discards_warmup_and_uses_challenge_keys():
    calls = []
    systems = [_fake("reference", 0.004, 0.002, calls), _fake("engine", 0.001, 0.001, calls)]
    out = run_protocol(systems, np.zeros(10), warmup=3, iters=4)
    assert len(calls) == 2 * 2 * 7
    assert [c[0] for c in calls[:4]] == ["reference", "reference", "engine", "engine"]  # interleaved per iteration
    for name in ("reference", "engine"):
        r = out[name]
        assert r["iterations"] == 4 and r["warmup_discarded"] == 3
        assert set(CHALLENGE_KEYS) - {"average_memory_usage_gb"} <= set(r)
        assert abs(r["average_inference_time_sec"] - (r["average_ttft_sec"] + r["average_tpot_sec"])) < 1e-9
    rat = ratios(out, "reference")["engine"]
    assert rat["average_ttft_sec"] == out["engine"]["average_ttft_sec"] / out["reference"]["average_ttft_sec"]
    assert rat["average_ttft_sec"] < 1.0


def test_peak_rss_is_positive():
    assert 0 < peak_rss_gb() < 64


def test_bench_cli_on_a_tiny_bundle(tmp_path, tiny_dir):
    from test_cli import run

    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe

    bundle = tmp_path / "fp32"
    build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=bundle))
    proc = run("bench", bundle, "--model", tiny_dir / "config.yaml", "--warmup", "1", "--iters", "2", "--stage-iters", "1",
               "--audio-seconds", "2", "--no-memory", "--out", tmp_path / "b.json", "--markdown", tmp_path / "b.md",
               "--batch-sizes", "1,2", "--new-tokens", "2", "--plot", tmp_path / "b.png")
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["protocol"]) == {"reference", "engine:fp32"}
    assert result["protocol"]["reference"]["iterations"] == 2
    assert "engine:fp32" in result["ratios"] and result["bandwidth_gbs"] > 0
    assert set(result["stages"]["engine:fp32"]) >= {"whisper", "beats", "qformer_projection", "prefill"}
    assert (tmp_path / "b.md").read_text().startswith("# salmonn-export bench")
    assert set(result["sizes_mb_by_component"]["engine:fp32"]) >= {"whisper_encoder", "beats", "qformer", "decoder"}
    assert result["sizes_mb_by_component"]["reference"]["llm"] > 0
    gen = result["generation"]["engine:fp32"]
    assert set(gen["throughput"]) == {"1", "2"} and gen["throughput"]["2"]["clips_per_s"] > 0
    assert 1 <= gen["throughput"]["2"]["generated_tokens"] <= 4  # 2 clips x at most 2 new tokens
    assert gen["beam_search"]["generated_tokens"] >= 1 and gen["end_to_end_clip"]["seconds"] > 0
    assert (tmp_path / "b.png").is_file() or "matplotlib is not installed" in proc.stderr
    assert proc.returncode == 0
    bad = run("bench", bundle, "--iters", "0", check=False)
    assert bad.returncode == 2 and "'--iters': must be >= 1, got 0" in bad.stderr
    bad = run("bench", bundle, "--device", "tpu", check=False)
    assert bad.returncode == 2 and "--device must be cpu or cuda" in bad.stderr
    import torch

    if not torch.cuda.is_available():
        bad = run("bench", bundle, "--model", tiny_dir / "config.yaml", "--device", "cuda", check=False)
        assert bad.returncode == 2 and "no CUDA device" in bad.stderr


def test_bench_isolate_runs_each_system_alone(tmp_path, tiny_dir):
    """--isolate: reference, engine, reference again, each in its own process; the result has the
    interleaved run's keys, each system's own peak memory, and the reference's drift between its runs."""
    from test_cli import run

    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe

    bundle = tmp_path / "fp32"
    build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=bundle))
    proc = run("bench", bundle, "--model", tiny_dir / "config.yaml", "--isolate", "--warmup", "1", "--iters", "2",
               "--stage-iters", "1", "--audio-seconds", "2", "--out", tmp_path / "b.json", "--markdown", tmp_path / "b.md")
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["settings"]["isolated"] and result["settings"]["order"] == [str(tiny_dir / "config.yaml"), str(bundle),
                                                                              str(tiny_dir / "config.yaml")]
    assert set(result["protocol"]) == {"reference", "engine:fp32"} and "engine:fp32" in result["ratios"]
    assert all(result["protocol"][n]["iterations"] == 2 for n in result["protocol"])
    assert all(0 < result["memory"][n]["peak_rss_gb"] < 64 for n in result["protocol"])
    assert set(result["reference_drift"]) == {"average_ttft_sec", "average_tpot_sec"}
    assert result["generation"] is None and "One process per system" in (tmp_path / "b.md").read_text()
    assert proc.returncode == 0
