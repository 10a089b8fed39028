"""Runtime: HF-exact generation, fp32 bundle = reference, batching, refusals, verify, no torch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from salmonn_export.audio import load_audio
from salmonn_export.bundle import sha256_file
from salmonn_export.errors import SalmonnError
from salmonn_export.export.build import BuildOptions, build_bundle
from salmonn_export.harness.parity import Item, judge, verify
from salmonn_export.recipes import load_recipe
from salmonn_export.runtime.engine import Engine
from salmonn_export.runtime.generation import GenerationSettings, generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fp32_bundle(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "fp32"
    build_bundle(tiny_dir / "config.yaml", load_recipe("fp32"), BuildOptions(out=out))
    return out


@pytest.fixture(scope="module")
def engine(fp32_bundle):
    return Engine(fp32_bundle)


def _torch_step(lm):
    def step(embeds, mask, positions, past):
        cache = past if past is not None else DynamicCache(config=lm.config)
        with torch.no_grad():
            out = lm(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(positions), past_key_values=cache, use_cache=True)
        return out.logits.numpy(), out.past_key_values

    def reorder(cache, idx):
        cache.reorder_cache(torch.from_numpy(idx))
        return cache

    return step, reorder


@pytest.mark.parametrize("beams,length_penalty,rep,max_new", [(1, 1.0, 1.0, 12), (2, 1.0, 1.0, 8), (4, 1.0, 1.0, 12),
                                                               (4, 0.5, 1.0, 10), (5, 2.0, 1.3, 9), (1, 1.0, 1.3, 10)])
def test_generation_equals_transformers_generate(tiny_model, beams, length_penalty, rep, max_new):
    lm = tiny_model.causal_lm
    torch.manual_seed(beams * 7 + max_new)
    speech = torch.randn(2, 88, 64) * 3
    embeds, atts = tiny_model.prompt_wrap(speech, tiny_model.prompts_for(["asr", "aac"]))  # right-padded row 2
    overrides = dict(num_beams=beams, length_penalty=length_penalty, repetition_penalty=rep, max_new_tokens=max_new)
    expected = tiny_model.generate_ids(embeds, atts, **overrides).numpy()
    kwargs = tiny_model.generation_kwargs(**overrides)
    eos = lm.generation_config.eos_token_id
    settings = GenerationSettings(max_new_tokens=max_new, num_beams=beams, eos_token_ids=eos if isinstance(eos, list) else [eos],
                                  pad_token_id=kwargs["pad_token_id"], min_length=kwargs["min_length"],
                                  repetition_penalty=rep, length_penalty=length_penalty)
    step, reorder = _torch_step(lm)
    emb = lm.get_input_embeddings()
    got = generate(embeds.numpy(), atts.numpy(), settings, step, reorder,
                   lambda ids: emb(torch.from_numpy(np.asarray(ids))).detach().numpy()[:, None, :])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("beams", [1, 4])
def test_fp32_bundle_reproduces_the_reference_exactly(tiny_model, engine, audio_dir, beams):
    for name, task in (("speech_a.wav", "asr"), ("speech_b.wav", "asr"), ("tone_2s.wav", "aac"), ("stereo_22k.wav", "aac")):
        wave = load_audio(audio_dir / name)
        ref, _ = tiny_model.generate_batch(tiny_model.make_batch([wave], [task]), num_beams=beams)
        assert engine.run_waves([wave], [task], num_beams=beams).texts == ref, name


def test_batched_equals_unbatched_and_mixed_batches_equal_the_reference(tiny_model, engine, audio_dir):
    waves = [load_audio(audio_dir / "tone_2s.wav"), load_audio(audio_dir / "chirp_2s.wav")]
    for beams in (1, 4):
        single = [engine.run_waves([w], ["aac"], num_beams=beams).texts[0] for w in waves]
        assert engine.run_waves(waves, ["aac", "aac"], num_beams=beams).texts == single
    # mixed tasks: [PAD] sits between prompt and answer (spec 8.4), so only the batched reference is comparable
    mixed = engine.run_waves(waves, ["asr", "aac"]).texts
    ref, _ = tiny_model.generate_batch(tiny_model.make_batch(waves, ["asr", "aac"]))
    assert mixed == ref


def test_engine_refuses_altered_or_incomplete_bundles(fp32_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(fp32_bundle, bad)
    (bad / "decoder.onnx.data").write_bytes(b"\0" * 16)
    with pytest.raises(SalmonnError, match="decoder.onnx.data` was altered"):
        Engine(bad)
    with pytest.raises(SalmonnError, match="no manifest.json"):
        Engine(tmp_path)
    with pytest.raises(SalmonnError, match="engine bundle does not exist"):
        Engine(tmp_path / "not-there")
    with pytest.raises(SalmonnError, match="--device cuda"):
        Engine(fp32_bundle, device="cuda")


def test_verify_passes_fp32_and_fails_a_corrupted_bundle(tiny_model, engine, fp32_bundle, audio_dir, tmp_path):
    items = [Item(audio_dir / "speech_a.wav", "asr"), Item(audio_dir / "tone_2s.wav", "aac")]
    result = verify(tiny_model, engine, items)
    assert judge(result, engine.manifest)["passed"], result
    assert result["end_to_end"]["exact_match"] == 1.0
    # corrupt one weight tensor (Q-Former projection bias region) and re-sign the manifest: only verify can tell
    bad = tmp_path / "corrupt"
    shutil.copytree(fp32_bundle, bad)
    data = np.fromfile(bad / "qformer.onnx.data", dtype=np.float32)
    data[-4096:] += 0.5
    data.tofile(bad / "qformer.onnx.data")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["qformer.onnx.data"] = sha256_file(bad / "qformer.onnx.data")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    broken = verify(tiny_model, Engine(bad), items)
    verdict = judge(broken, manifest)
    assert not verdict["passed"]
    assert not verdict["checks"]["speech_embeds_cosine"]["passed"]


def test_cli_verify_frees_the_reference_before_the_engine_loads(tiny_model, engine, fp32_bundle, tiny_dir, audio_dir,
                                                                 tmp_path, monkeypatch):
    """`salmonn-export verify` runs the reference on every item, frees it, then loads the engine (so a
    3B reference and an fp32 3B engine are never resident together), and reports what the
    in-process `verify` of both loaded sides reports."""
    import gc

    from typer.testing import CliRunner

    import salmonn_export.runtime.engine as engine_module
    from salmonn_export.cli import app
    from salmonn_export.model.salmonn import SALMONN

    items = [Item(audio_dir / "speech_a.wav", "asr"), Item(audio_dir / "tone_2s.wav", "aac")]
    expected = verify(tiny_model, engine, items)
    alive_at_engine_load = []
    real_init = engine_module.Engine.__init__

    def init(self, *args, **kwargs):
        gc.collect()
        # type(), not isinstance(): a dead weakref.proxy among the objects raises on attribute access
        alive_at_engine_load.append(sum(type(o) is SALMONN and o is not tiny_model for o in gc.get_objects()))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "__init__", init)
    (tmp_path / "ann.json").write_text(json.dumps({"annotation": [
        {"testset_id": f"t{n}", "path": str(i.audio), "task": "asr" if i.task == "asr" else "audiocaption_v2",
         "text": "x"} for n, i in enumerate(items)]}))
    result = CliRunner().invoke(app, ["verify", str(fp32_bundle), "--model", str(tiny_dir / "config.yaml"),
                                      "--data", str(tmp_path / "ann.json"), "--report", str(tmp_path / "v.json")])
    assert result.exit_code == 0, result.output
    assert alive_at_engine_load == [0]
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["first_token"] == expected["first_token"] and saved["stages"] == expected["stages"]
    assert [r["engine"] for r in saved["rows"]] == [r["engine"] for r in expected["rows"]]


def test_runtime_runs_without_torch(fp32_bundle, audio_dir):
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "transformers" or name.startswith("salmonn_export.model"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from salmonn_export.runtime.engine import Engine
eng = Engine({str(fp32_bundle)!r})
print(eng.transcribe([{str(audio_dir / 'tone_2s.wav')!r}], "aac", max_new_tokens=4))
assert "torch" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("[")


def test_verify_refuses_a_config_of_another_windowing_and_warns_on_a_changed_one(fp32_bundle, tiny_dir, audio_dir,
                                                                                  tmp_path):
    """A config whose Q-Former windows differ from the bundle's is another model: one error line, exit 2,
    before anything loads (it crashed on mismatched shapes). A config edited since the build still
    verifies, with a warning line."""
    import yaml
    from test_cli import run

    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["second_per_window"] = cfg["model"]["second_stride"] = 0.5
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = run("verify", fp32_bundle, "--model", other / "config.yaml", "--data", audio_dir, check=False)
    assert proc.returncode == 2 and "Q-Former windowing" in proc.stderr and "another model" in proc.stderr
    assert "Traceback" not in proc.stderr
    edited = tmp_path / "edited"
    shutil.copytree(tiny_dir, edited)
    (edited / "config.yaml").write_text((tiny_dir / "config.yaml").read_text() + "\n# edited\n")
    data = tmp_path / "one"
    data.mkdir()
    shutil.copy(audio_dir / "speech_a.wav", data / "speech_a.wav")
    proc = run("verify", fp32_bundle, "--model", edited / "config.yaml", "--data", data, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{edited / 'config.yaml'} differs from the config the bundle was built from" in proc.stderr


def test_unknown_task_stops_before_anything_loads(fp32_bundle, tiny_dir, audio_dir, tmp_path):
    """At real size a load takes minutes: `run` and `generate` check the task against the prompts first.
    The engine copy's decoder is garbage and the config copy lacks its checkpoint, so a check after the
    load would report those instead."""
    broken = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, broken)
    (broken / json.loads((broken / "manifest.json").read_text())["components"]["decoder"]["file"]).write_bytes(b"x")
    config = tmp_path / "model" / "config.yaml"
    shutil.copytree(tiny_dir, config.parent)
    raw = config.read_text()
    ckpt = next(line.split(":", 1)[1].strip() for line in raw.splitlines() if line.strip().startswith("ckpt:"))
    (config.parent / ckpt).unlink()
    clip = audio_dir / "tone_2s.wav"
    for args in (["run", "--engine", broken], ["generate", "--model", config]):
        for task, hint in (("nope", ""), ("ASR", " (did you mean `asr`?)"), ("caption", " (did you mean `audiocaption`?)")):
            proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args), "--task", task, str(clip)],
                                  capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 2 and lines[-1].startswith(f"error: unknown task `{task}`{hint}; "), proc.stderr
            assert "known: asr, aac" in lines[-1]
