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
    model: ModelOpt = None,
    as_json: JsonOpt = False,
):
    """Show a trained SALMONN's components, parameter counts, dtypes, LoRA setup, checkpoint contents
    and every consistency problem found. Exit code 1 when problems are found.

    Example: salmonn-export inspect --model path/to/config.yaml
    """
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
    if not audio:
        if model is not None:
            raise SalmonnError("give audio files to transcribe (demo clips exist only for the demo model)")
        from salmonn_export.model.demo import demo_clips

        audio = demo_clips(task)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SalmonnError("--device cuda: no CUDA device is visible to this torch build")
    t0 = time.perf_counter()
    salmonn = load_salmonn(config, device=device)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    texts = salmonn.transcribe(audio, task, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens)
    gen_s = time.perf_counter() - t1
    if as_json:
        print(json.dumps({"task": task, "config": str(config), "load_seconds": round(load_s, 3),
                          "generate_seconds": round(gen_s, 3),
                          "results": [{"audio": str(a), "text": t} for a, t in zip(audio, texts)]},
                         indent=1, ensure_ascii=False))
    else:
        for a, t in zip(audio, texts):
            sys.stdout.write(f"{a}\t{t!r}\n" if not t.isprintable() else f"{a}\t{t}\n")


if __name__ == "__main__":
    app()
