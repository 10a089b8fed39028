"""What every command shares: the Typer app, consoles, error handling, common options and helpers.

Every user-fixable problem is a `SalmonnError`, printed on one line with exit code 2 (`handle_errors`).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
EngineOpt = Annotated[Path | None, typer.Option("--engine", "-e", help="Engine bundle folder (default: the demo "
                                                                         "model's w4a16 bundle, built on first use).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, tensorrt or auto (TensorRT → CUDA → CPU). A missing "
                                             "provider is an error, never a silent fallback.")]
TaskOpt = Annotated[str, typer.Option("--task", "-t", help="asr (WER) or aac (the challenge's SPIDEr = CIDEr-D × 100).")]


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


def model_config(model: Path | None) -> Path:
    if model is not None:
        return model
    from salmonn_export.model.demo import ensure_demo_model

    with err.status("preparing the demo SALMONN (first use only)..."):
        return ensure_demo_model()


def audio_or_demo(audio: list[Path] | None, task: str, explicit: bool, what: str) -> list[Path]:
    """The given files, or the demo clips when running the demo default."""
    if audio:
        return audio
    if explicit:
        raise SalmonnError(f"give audio files (demo clips exist only for the demo {what})")
    from salmonn_export.model.demo import demo_clips

    return demo_clips(task)


def print_texts(audio: list[Path], texts: list[str], as_json: bool, info: dict) -> None:
    """One `file<TAB>text` line per file (repr() when the text has unprintable characters), or JSON;
    a `warning:` line on stderr (and `dropped_seconds` in JSON) for audio past the model's 30 s."""
    dropped = [warn_dropped_audio(a) for a in audio]
    if as_json:
        results = [{"audio": str(a), "text": t, "dropped_seconds": d} for a, t, d in zip(audio, texts, dropped)]
        print(json.dumps({**info, "results": results}, indent=1, ensure_ascii=False))
        return
    for a, t in zip(audio, texts):
        sys.stdout.write(f"{a}\t{t!r}\n" if not t.isprintable() else f"{a}\t{t}\n")


def warn_dropped_audio(path: Path) -> float:
    """Seconds of `path` past the model's 30 s window (0.0 if none; header only), with a `warning:` line
    on stderr when there are any: the model never sees them (the challenge truncates too)."""
    from salmonn_export.audio import MAX_SECONDS, audio_seconds, dropped_note

    seconds = audio_seconds(path)
    note = dropped_note(path, seconds)
    if note:
        err.print(f"warning: {note}", highlight=False, soft_wrap=True)
    return round(max(0.0, seconds - MAX_SECONDS), 3)


def engine_path(engine: Path | None) -> Path:
    if engine is not None:
        return engine
    from salmonn_export.harness.demo_bundle import ensure_demo_bundle

    with err.status("preparing the demo engine bundle (first use only)..."):
        return ensure_demo_bundle()


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
