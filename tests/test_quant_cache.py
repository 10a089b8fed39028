"""The quantization cache: an interrupted GPTQ resumes with bit-identical codes, recipes sharing a
weight format share layers, damaged or mismatched entries are recomputed, and a cached build
writes the same bundle as an uncached one."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from salmonn_export.recipes import load_recipe
from salmonn_export.transforms.calibration import build_calibration, calibration_items
from salmonn_export.transforms.lora import merged_llm
from salmonn_export.transforms.quant_cache import LayerStore, QuantCache
from salmonn_export.transforms.quantize import quantize_model

LAYER_LINEARS = 7  # q, k, v, o, gate, up, down per decoder layer of the tiny preset (2 layers)


@pytest.fixture(scope="module")
def calib(tiny_model, calib_audio_dir):
    return build_calibration(tiny_model, calibration_items(calib_audio_dir), load_recipe("w4a16").calibration)


@pytest.fixture(scope="module")
def merged(tiny_model):
    return merged_llm(tiny_model)


def _same(a, b):
    assert set(a.layers) == set(b.layers)
    for n in a.layers:
        assert torch.equal(a.layers[n].codes, b.layers[n].codes), n
        assert torch.equal(a.layers[n].scales, b.layers[n].scales), n
    assert a.errors == b.errors


class _Interrupt(Exception):
    pass


def _stop_after(count):
    def progress(_name, done, _total):
        if done == count:
            raise _Interrupt
    return progress


@pytest.mark.parametrize("stop_at", [LAYER_LINEARS + 3, LAYER_LINEARS, LAYER_LINEARS + 1, 2 * LAYER_LINEARS])
def test_interrupted_gptq_resumes_bit_identical(merged, calib, tmp_path, stop_at):
    """Interrupted inside layer 1, at layer 0's last Linear (before the layer is stored), at layer 1's
    first, or at the last layer's last: the resumed run reads every stored layer and ends with the
    uninterrupted run's codes, scales and errors."""
    q = load_recipe("w4a16").llm
    fresh = quantize_model(copy.deepcopy(merged), q.weights, q.skip_modules, calib)
    store = LayerStore(tmp_path / "store")
    with pytest.raises(_Interrupt):
        quantize_model(copy.deepcopy(merged), q.weights, q.skip_modules, calib, progress=_stop_after(stop_at),
                       release_weights=True, store=store)
    finished_layers = (stop_at - 1) // LAYER_LINEARS  # a layer is stored after its last Linear reports
    store = LayerStore(tmp_path / "store")
    resumed = quantize_model(copy.deepcopy(merged), q.weights, q.skip_modules, calib, release_weights=True, store=store)
    assert store.hits == finished_layers
    _same(fresh, resumed)


def test_recipes_sharing_a_weight_format_share_layers(merged, calib, tmp_path):
    """w4a16 fills the store; w4a16-lmhead (tied head quantized) reads both layers and adds the head;
    the results equal uncached runs. w4a8 keys to the same layers, w8a16 to others."""
    cache = QuantCache(tmp_path)
    w4, head = load_recipe("w4a16").llm, load_recipe("w4a16-lmhead").llm
    assert cache.layer_store("k", w4.weights).folder == cache.layer_store("k", load_recipe("w4a8").llm.weights).folder
    assert cache.layer_store("k", w4.weights).folder != cache.layer_store("k", load_recipe("w8a16").llm.weights).folder
    assert cache.layer_store("k", w4.weights).folder != cache.layer_store("k2", w4.weights).folder
    quantize_model(copy.deepcopy(merged), w4.weights, w4.skip_modules, calib, store=cache.layer_store("k", w4.weights))

    def tied():
        model = copy.deepcopy(merged)
        model.lm_head.weight = model.model.embed_tokens.weight
        return model

    skip = tuple(s for s in head.skip_modules if s != "lm_head")
    expected = quantize_model(tied(), head.weights, skip, calib)
    store = cache.layer_store("k", head.weights)
    got = quantize_model(tied(), head.weights, skip, calib, store=store)
    assert store.hits == 2 and "lm_head" in got.layers
    _same(expected, got)
    store = cache.layer_store("k", head.weights)
    again = quantize_model(tied(), head.weights, skip, calib, store=store)
    assert store.hits == 3  # both layers and the stored head
    _same(expected, again)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_names", "hidden_wrong_count", "hidden_garbage"])
def test_damaged_or_mismatched_entries_are_recomputed(merged, calib, tmp_path, damage):
    q = load_recipe("w4a16").llm
    folder = tmp_path / "store"
    expected = quantize_model(copy.deepcopy(merged), q.weights, q.skip_modules, calib, store=LayerStore(folder))
    layer0 = folder / "layer_0.pt"
    if damage == "garbage":
        layer0.write_bytes(b"not a torch file")
    elif damage == "truncated":
        layer0.write_bytes(layer0.read_bytes()[:100])
    elif damage == "other_names":
        entry = torch.load(layer0, weights_only=False)
        torch.save({f"renamed.{k}": v for k, v in entry.items()}, layer0)
    elif damage == "hidden_garbage":
        next(folder.glob("hidden_*.pt")).write_bytes(b"\x00garbage" * 100)
    else:
        hidden = next(folder.glob("hidden_*.pt"))
        torch.save(torch.load(hidden, weights_only=False)[:1], hidden)
    store = LayerStore(folder)
    got = quantize_model(copy.deepcopy(merged), q.weights, q.skip_modules, calib, store=store)
    assert store.hits == (2 if damage.startswith("hidden") else 1)  # layer 0 is never taken from a bad entry
    _same(expected, got)


def test_cached_build_writes_the_same_bundle(tiny_dir, audio_dir, tmp_path):
    """Second build of the same recipe reads the calibration, log-probs and layers back; the bundle's
    files hash the same as the first (and as an uncached build)."""
    from typer.testing import CliRunner

    from salmonn_export.cli import app

    calib = tmp_path / "calib"
    calib.mkdir()
    for f in sorted(audio_dir.glob("*.wav"))[:3]:
        if f.name != "broken.wav":
            shutil.copy(f, calib / f.name)
    runner = CliRunner()
    reports = []
    for name, extra in (("a", ["--cache-dir", str(tmp_path / "cache")]), ("b", ["--cache-dir", str(tmp_path / "cache")]),
                        ("c", ["--no-cache"])):
        result = runner.invoke(app, ["build", "--recipe", "w4a16", "--model", str(tiny_dir / "config.yaml"),
                                     "--calib", str(calib), "--out", str(tmp_path / name), "--json", *extra])
        assert result.exit_code == 0, result.output
        reports.append(json.loads((tmp_path / name / "build_report.json").read_text()))
    first, second, uncached = reports
    assert first["quantization_cache"]["sequences"] == "written" and first["quantization_cache"]["gptq_entries_read"] == 0
    assert second["quantization_cache"]["sequences"] == "read"
    assert second["quantization_cache"]["reference_log_probs"] == "read"
    assert second["quantization_cache"]["gptq_entries_read"] == 2
    assert uncached["quantization_cache"] is None
    manifests = [json.loads((tmp_path / n / "manifest.json").read_text()) for n in "abc"]
    assert manifests[0]["files"] == manifests[1]["files"] == manifests[2]["files"]
    assert second["quantization_eval"] == first["quantization_eval"]


def test_interrupted_cli_build_leaves_no_bundle_and_resumes(tiny_dir, audio_dir, tmp_path, monkeypatch):
    """Ctrl-C inside GPTQ's second decoder layer: exit 130, a resume hint, no bundle or temp folder;
    the same command then reads layer 0 back and writes the bundle an uncached build writes."""
    from typer.testing import CliRunner

    import salmonn_export.transforms.quantize as quantize
    from salmonn_export.cli import app

    calib = tmp_path / "calib"
    calib.mkdir()
    for f in sorted(audio_dir.glob("*.wav"))[:3]:
        if f.name != "broken.wav":
            shutil.copy(f, calib / f.name)
    real_gptq, calls = quantize.gptq, []

    def interrupting_gptq(*args, **kwargs):
        calls.append(1)
        if len(calls) == LAYER_LINEARS + 2:
            raise KeyboardInterrupt
        return real_gptq(*args, **kwargs)

    common = ["build", "--recipe", "w4a16", "--model", str(tiny_dir / "config.yaml"), "--calib", str(calib)]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    runner = CliRunner()
    monkeypatch.setattr(quantize, "gptq", interrupting_gptq)
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "b"), *cache])
    assert result.exit_code == 130
    assert "the same command resumes there" in result.output
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))
    monkeypatch.setattr(quantize, "gptq", real_gptq)
    result = runner.invoke(app, [*common, "--out", str(tmp_path / "b"), *cache])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "build_report.json").read_text())
    assert report["quantization_cache"]["gptq_entries_read"] == 1
    assert runner.invoke(app, [*common, "--out", str(tmp_path / "fresh"), "--no-cache"]).exit_code == 0
    files = [json.loads((tmp_path / n / "manifest.json").read_text())["files"] for n in ("b", "fresh")]
    assert files[0] == files[1]


def test_calibration_key_ignores_added_settings_at_their_old_value(tmp_path):
    """A settings field added after cache format 1 (`source`) keeps keys of earlier caches while at the
    value they implied, and changes the key otherwise."""
    from dataclasses import replace

    from salmonn_export.recipes import Calibration

    cache = QuantCache(tmp_path)
    key = lambda settings: cache.calibration_key({"llm": "h"}, {"sha256": "d"}, [], settings)  # noqa: E731
    format_1 = {"samples": 16, "tasks": ("asr", "aac"), "teacher_forcing": True, "seed": 0}
    from salmonn_export.transforms import quant_cache

    assert key(Calibration()) == quant_cache.digest({
        "format": 1, "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "model": {"llm": "h"}, "data": {"sha256": "d"}, "items": [], "settings": format_1})
    assert key(replace(Calibration(), source="text")) != key(Calibration())
    assert key(replace(Calibration(), samples=8)) != key(Calibration())


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_unusable_cache_dirs_are_one_line_errors_before_any_work(capsys, tiny_dir, tmp_path, where):
    from test_cli_conventions import assert_one_line_error, cli

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    cache = {"file": blocker, "under_file": blocker / "sub", "proc": Path("/proc/no-such/cache")}[where]
    code, _out, err = cli(capsys, "build", "--recipe", "w4a16", "--model", tiny_dir / "config.yaml",
                          "--out", tmp_path / "b", "--cache-dir", cache)
    assert_one_line_error(code, err, str(cache))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


def test_a_cache_that_cannot_be_written_does_not_fail_the_build(merged, calib, tmp_path):
    """Entries that cannot be stored (disk full, permissions) are reported, not raised."""
    q = load_recipe("w4a16").llm
    folder = tmp_path / "store"
    folder.write_text("a file where the store's folder should be")
    store = LayerStore(folder)
    got = quantize_model(copy.deepcopy(merged), q.weights, q.skip_modules, calib, store=store)
    assert store.write_error and "store" in store.write_error
    _same(quantize_model(copy.deepcopy(merged), q.weights, q.skip_modules, calib), got)
    cache = QuantCache(folder)
    assert cache.cached("sequences", "k", lambda: [1, 2]) == [1, 2]
    assert cache.used["sequences"] == "not stored" and cache.used["write_error"]
