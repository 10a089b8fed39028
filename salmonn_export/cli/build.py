"""Commands that make engine bundles: recipes, build."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from salmonn_export.cli.common import (
    COUNT_MAX,
    SEED_MAX,
    JsonOpt,
    ModelOpt,
    app,
    bounded,
    err,
    handle_errors,
    model_config,
    out,
)


@app.command()
@handle_errors
def recipes(as_json: JsonOpt = False):
    """List the built-in build recipes (recipes/*.yaml); `build --recipe PATH.yaml` takes your own.

    Example: salmonn-export recipes --json
    """
    from salmonn_export.recipes import builtin_recipes, load_recipe

    rows = []
    for name in builtin_recipes():
        r = load_recipe(name)
        w = r.llm.weights
        rows.append({"name": name, "description": r.description,
                     "llm_weights": None if w is None else f"{w.method} int{w.bits} g{w.group_size}",
                     "precisions": {k: c.precision for k, c in r.components.items()}})
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title="build recipes")
    for col in ("name", "LLM weights", "description"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["llm_weights"] or "-", row["description"])
    out.print(table)


@app.command()
@handle_errors
def build(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Built-in recipe (see `recipes`) or a .yaml path.")] = "w4a16",
    model: ModelOpt = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Bundle folder (default engines/<model>-<recipe>).")] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration audio: a folder or an annotation .json "
                                                    "(default: the config's datasets valid/test/train annotation; "
                                                    "the demo clips for the demo model).")] = None,
    audio_root: Annotated[Path | None, typer.Option(help="Audio prefix for a --calib annotation: paths become ROOT + '/' + "
                                                        "path, as under `datasets.prefix` (default: relative to the "
                                                        "annotation).")] = None,
    calib_samples: Annotated[int | None, typer.Option(callback=bounded(1, COUNT_MAX),
                                                      help="Calibration sequences (default from the recipe).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Also build TensorRT engines for the encoders and Q-Former.")] = False,
    seed: Annotated[int, typer.Option(callback=bounded(0, SEED_MAX), help="Seed for calibration order and dummy inputs.")] = 0,
    target: Annotated[str, typer.Option(help="onnx (ONNX graphs for onnxruntime/TensorRT) or torch (safetensors for "
                                             "the PyTorch engine: CUDA graphs + int4 kernels; no onnx needed).")] = "onnx",
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Quantization cache: calibration sequences, reference log-probs and each GPTQ layer as it "
                            "finishes, so an interrupted build resumes and recipes sharing a weight format (w4a16, "
                            "w4a8, w4a8-int8enc, w4a16-lmhead) run GPTQ once. Default: quantization/ in $SALMONN_EXPORT_CACHE or "
                            "~/.cache/salmonn-export; ~1 byte per LLM weight.")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Compute everything; read and write no cache.")] = False,
    as_json: JsonOpt = False,
):
    """Build an engine bundle: merge LoRA, quantize the LLM, export every component to ONNX, validate.

    With --target torch: the same LoRA merge and quantization (the same int4 codes), written as
    safetensors for the PyTorch engine (`run --engine B --device cuda`).

    An interrupted build (Ctrl-C, SIGTERM) leaves no bundle behind but keeps its finished calibration
    and GPTQ layers in the quantization cache: the same command resumes where it stopped.

    Example: salmonn-export build --recipe w4a16 --model path/to/config.yaml --out engines/mine-w4a16
    """

    from salmonn_export.errors import SalmonnError
    from salmonn_export.recipes import load_recipe

    if target not in ("onnx", "torch"):
        raise SalmonnError(f"unknown --target `{target}`; choose onnx or torch")
    if target == "torch" and trt:
        raise SalmonnError("--trt builds TensorRT engines from ONNX graphs; --target torch has none")
    rec = load_recipe(recipe)
    config = model_config(model)
    from salmonn_export.model.config import check_model_files, load_config

    # a missing or malformed config, or a file it names, is one line before torch is imported (~5 s)
    check_model_files(load_config(config))
    if out_dir is None:
        stem = "demo" if model is None else config.resolve().parent.name
        out_dir = Path("engines") / f"{stem}-{rec.name}{'-torch' if target == 'torch' else ''}"
    from salmonn_export.files import check_output_dir

    check_output_dir(out_dir, "bundle")  # before anything is built
    from salmonn_export.transforms.quant_cache import check_cache_dir, default_cache_dir

    cache = None if no_cache else (cache_dir or default_cache_dir())
    if cache is not None and rec.llm.weights is not None:
        check_cache_dir(cache)  # before anything is built: a file or unwritable place is one line, exit 2
    try:
        report = _run_build(target, config, rec, out_dir, (calib, audio_root), calib_samples, force, trt, seed, cache,
                            as_json)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Terminated): the bundle's temp folder is already gone
        if cache is not None and rec.llm.weights is not None:
            err.print(f"finished calibration and GPTQ layers are kept in {cache}: the same command resumes there",
                      soft_wrap=True, highlight=False)
        raise
    _print_report(report, target, as_json)


@contextlib.contextmanager
def _stage_log(as_json: bool):
    """A StageLog that shows progress on stderr: rich bars on a terminal; plain timestamped lines when
    stderr is a file or pipe (a background build's log then shows each stage and layer as it happens)."""
    from salmonn_export.export.stages import StageLog

    if not err.is_terminal:
        t0 = time.perf_counter()
        stage = {"name": ""}

        def line(text: str) -> None:
            print(f"[{time.perf_counter() - t0:8.1f}s] {text}", file=sys.stderr, flush=True)

        def on_stage(name):
            stage["name"] = name
            line(name)

        yield StageLog(on_stage=on_stage, on_progress=lambda name, done, total: line(
            f"  {stage['name']}: {done}/{total} {name}"))
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=as_json) as progress:
        current = {"task": None}

        def on_stage(name):
            if current["task"] is not None:
                progress.update(current["task"], completed=1, total=1)
            current["task"] = progress.add_task(name, total=1)

        def on_progress(_name, done, total):
            progress.update(current["task"], completed=done, total=total)

        yield StageLog(on_stage=on_stage, on_progress=on_progress)
        if current["task"] is not None:
            progress.update(current["task"], completed=1, total=1)


def _run_build(target, config, rec, out_dir, calib_source, calib_samples, force, trt, seed, cache, as_json) -> dict:
    calib, audio_root = calib_source
    with _stage_log(as_json) as log:
        if target == "torch":
            from salmonn_export.export.torch_bundle import TorchBuildOptions, build_torch_bundle

            return build_torch_bundle(config, rec, TorchBuildOptions(out=out_dir, calib=calib, audio_root=audio_root,
                                                                     calib_samples=calib_samples,
                                                                     force=force, seed=seed, cache_dir=cache), log)
        from salmonn_export.export.build import BuildOptions, build_bundle

        return build_bundle(config, rec, BuildOptions(out=out_dir, calib=calib, audio_root=audio_root,
                                                      calib_samples=calib_samples, force=force, trt=trt, seed=seed,
                                                      cache_dir=cache), log)


def _print_report(report: dict, target: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=1, default=str))
        return
    out.print(f"built [bold]{report['bundle']}[/] in {report['total_seconds']:.1f} s, "
              f"{report['bundle_bytes'] / 1e6:.2f} MB")
    if target == "torch":
        for name, size in report["sizes"].items():
            out.print(f"  {name:16s} {size / 1e6:8.2f} MB")
        return
    for name, v in report["validation"].items():
        out.print(f"  {name:16s} {report['sizes'][name] / 1e6:8.2f} MB  max rel err {v['max_rel']:.2e}  cosine {v['cosine']:.8f}")
    cache_use = report.get("quantization_cache")
    if cache_use:
        labels = {"sequences": "calibration sequences", "reference_log_probs": "reference log-probs"}
        read = [labels[k] for k in labels if cache_use.get(k) == "read"]
        if cache_use.get("gptq_entries_read"):
            read.append(f"{cache_use['gptq_entries_read']} GPTQ entries")
        written = [labels[k] for k in labels if cache_use.get(k) == "written"] + (["GPTQ layers"] if "gptq" in cache_use else [])
        out.print(f"  quantization cache {cache_use['folder']}: read {', '.join(read) or 'nothing'}"
                  + (f"; stored {', '.join(written)}" if written and not cache_use.get("gptq_entries_read") else ""),
                  soft_wrap=True, highlight=False)
        if cache_use.get("write_error"):
            err.print(f"warning: the quantization cache could not be written ({cache_use['write_error']})",
                      soft_wrap=True, highlight=False)
    if report["quantization_eval"]:
        q = report["quantization_eval"]
        out.print(f"  LLM vs fp32 on calibration: KL {q['mean_kl']:.4g}, top-1 agreement {q['top1_agreement']:.3f}")
    if report["tensorrt"].get("status") not in ("not requested", "built"):
        err.print(f"TensorRT skipped: {report['tensorrt'].get('reason')}")
