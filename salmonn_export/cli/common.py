"""What every command shares: the Typer app, consoles, error handling, common options and helpers.

Every user-fixable problem is a `SalmonnError`, printed on one line with exit code 2 (`handle_errors`).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from salmonn_export import __version__
from salmonn_export.errors import SalmonnError, SalmonnWarning, Terminated
from salmonn_export.generation_rules import MAX_NEW_TOKENS_LIMIT as MAX_NEW_TOKENS_LIMIT  # re-exported for the commands
from salmonn_export.generation_rules import NUM_BEAMS_LIMIT as NUM_BEAMS_LIMIT


def _usage_error_types() -> tuple[type[Exception], type[Exception]]:
    """(ClickException, NoArgsIsHelpError) as typer raises them: its vendored click since 0.2x, click before."""
    try:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
    except ImportError:  # typer < 0.20 uses the click package
        from click.exceptions import ClickException, NoArgsIsHelpError
    return ClickException, NoArgsIsHelpError


_SIGTERM_SEEN: list[bool] = []


def _raise_terminated(signum, frame) -> None:
    _SIGTERM_SEEN.append(True)
    raise Terminated()


def _untyped_flags(params: list) -> list:
    """typer 0.29 labels every on/off flag `<bool>` in --help, as if it took a value (`--json true`
    is then refused as an extra argument); an empty metavar shows the flag alone, as click does."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _unwrapped(help_text: str | None) -> str | None:
    """typer 0.29's rich help joins the lines of a docstring's first paragraph but keeps the hard
    line breaks of the others, then wraps them again: ragged lines. Each paragraph becomes one line
    here (paragraphs stay apart; a paragraph starting with click's no-rewrap marker \\b is kept)."""
    if not help_text:
        return help_text
    paragraphs = inspect.cleandoc(help_text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n")) for p in paragraphs)


class _HelpFormat:
    """Mixed into the app's command and group classes: flags listed without `<bool>` (get_params),
    help paragraphs wrapped once (`_unwrapped`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _unwrapped(self.help)

    def get_params(self, ctx):
        return _untyped_flags(super().get_params(ctx))


class _Command(_HelpFormat, typer.core.TyperCommand):
    pass


class _Group(_HelpFormat, typer.core.TyperGroup):
    pass


class SalmonnTyper(typer.Typer):
    """The app's entry point: usage errors (an option out of its range, a bad value, an unknown
    option) print one line `error: ...` with exit 2 instead of a boxed usage screen, and SIGTERM
    raises `Terminated` (a KeyboardInterrupt) in the main thread, so a scheduler's stop cleans up
    exactly as Ctrl-C does (exit 143)."""

    def __call__(self, *args, **kwargs):
        argv = kwargs.get("args", args[0] if args else None)
        argv = sys.argv[1:] if argv is None else list(argv)
        if "" in argv:  # an unset shell variable: Path("") is the current folder, searched with .venv and all
            where = argv.index("")
            what = f"`{argv[where - 1]}`" if where and argv[where - 1].startswith("-") else "an argument"
            err.print(f"[bold red]error:[/] {what} is an empty string (an unset shell variable?)", markup=True,
                      highlight=False)
            sys.exit(2)
        click_exception, no_args_is_help = _usage_error_types()
        main_thread = threading.current_thread() is threading.main_thread()
        _SIGTERM_SEEN.clear()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except no_args_is_help:
            code = 2  # typer has printed the help
        except click_exception as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            err.print(f"[bold red]error:[/] {' '.join(exc.format_message().split())}{hint}", markup=True,
                      highlight=False, soft_wrap=True)
            code = exc.exit_code
        except typer.Abort:
            err.print("aborted")
            code = 1
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
        if code == 130 and _SIGTERM_SEEN:  # stopped before a command's handle_errors (typer made it Exit(130))
            err.print("terminated")
            code = 143
        sys.exit(code if isinstance(code, int) else 0)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = SalmonnTyper(
    name="salmonn-export",
    help="Compile a trained SALMONN (Whisper + BEATs + Q-Former + LoRA Llama) into verified engine bundles.\n\n"
    "Without --model, commands use the embedded demo SALMONN (built on first use, no downloads).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
# soft_wrap: lines piped to a file stay whole (rich wraps at 80 columns without a terminal)
out = Console(soft_wrap=True)
# soft_wrap: a log line or warning stays one line in a log file or pipe (rich wraps at 80 columns there)
err = Console(stderr=True, soft_wrap=True)

ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Challenge YAML config of a trained SALMONN (default: the demo model)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
EngineOpt = Annotated[Path | None, typer.Option("--engine", "-e", help="Engine bundle folder (default: the demo "
                                                                         "model's w4a16 bundle, built on first use).")]
TORCH_DEVICES = ("cpu", "cuda")
ENGINE_DEVICES = ("cpu", "cuda", "tensorrt", "auto")


def device_check(choices: tuple[str, ...], cuda_index: bool = True) -> Callable:
    """An option callback for `--device`: one of `choices`, or `cuda:N` (N a GPU index, when
    `cuda_index`). Any other value is a usage error: one line naming --device and the choices, exit 2
    (before anything is loaded). Whether the device is actually present is checked where it is used."""
    def check(value):
        if value is None or value in choices:
            return value
        if cuda_index and value.startswith("cuda:") and value[5:].isdigit() and value[5:].isascii() \
                and int(value[5:]) < 1024:
            return value
        names = [*choices, "cuda:N"] if cuda_index else list(choices)
        allowed = ", ".join(names[:-1]) + " or " + names[-1]
        raise typer.BadParameter(f"unknown device {value!r} (--device must be {allowed})")

    return check


DeviceOpt = Annotated[str, typer.Option(callback=device_check(ENGINE_DEVICES),
                                        help="cpu, cuda, cuda:N (a torch bundle), tensorrt or auto (TensorRT → "
                                             "CUDA → CPU). A missing provider is an error, never a silent "
                                             "fallback.")]
TorchDeviceOpt = Annotated[str, typer.Option("--device", callback=device_check(TORCH_DEVICES),
                                             help="cpu, cuda or cuda:N (fp16 autocast like the challenge).")]
TaskOpt = Annotated[str, typer.Option("--task", "-t", help="asr (WER) or aac (the challenge's SPIDEr = CIDEr-D × 100).")]


SEED_MAX = 2**32 - 1  # numpy and torch both take seeds in [0, 2**32)

# Upper bounds of count-like options: far above any real use, low enough that a typo (or 1e23) is a
# one-line usage error instead of an allocation failure or a run that never ends. Generation values
# (max_new_tokens, num_beams) share the config/manifest rules of `generation_rules`.
BATCH_MAX = 1024  # clips per batch (and serve's --max-batch): each is a row of every activation and KV cache
ITERS_MAX = 100_000  # bench warm-up/timed iterations
COUNT_MAX = 10_000_000  # item counts: --limit, --calib-samples, serve's --max-queue
WORKERS_MAX = 1024  # Ray actors/replicas


def bounded(low: float | None = None, high: float | None = None, *, above: float | None = None) -> Callable:
    """An option callback that refuses nan/inf and values below `low`, not above `above`, or above `high`.
    Every count-like option has a `high` (see BATCH_MAX, ITERS_MAX, ...): a huge value is a usage error,
    not an allocation failure deep inside numpy or torch.

    A refusal is a usage error: one line `error: Invalid value for '--x': must be >= 1, got 0`, exit 2.
    """
    def check(value):
        if value is None:
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number, got {value}")
        if low is not None and value < low:
            raise typer.BadParameter(f"must be >= {low}, got {value}")
        if above is not None and value <= above:
            raise typer.BadParameter(f"must be > {above}, got {value}")
        if high is not None and value > high:
            span = f"{low} to {high}" if low is not None else f"> {above}" if above is not None else None
            raise typer.BadParameter(f"must be <= {high}" + (f" (allowed: {span})" if span else "") + f", got {value}")
        return value

    return check


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Silence libraries' warnings; ours (SalmonnWarning) print as one `warning:` line, once."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("once", category=SalmonnWarning)
    warnings.showwarning = _show_warning
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
        except Terminated:
            err.print("terminated")
            raise typer.Exit(143) from None
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


def check_audio_files(paths: list[Path]) -> None:
    """Every file is checked before any model loads (minutes at real size): a mistyped name or a
    text file named .wav is one error line at once, not after earlier files' results. A missing file:
    `audio file not found`; a folder: `is a folder; give audio files` (a command-line argument; a
    folder named in an annotation gets the same kind of line); a header soundfile cannot read:
    load_clip's own `unreadable audio` line (with a conversion hint for .m4a)."""
    import soundfile as sf

    for path in paths:
        if not Path(path).is_file():
            raise SalmonnError("audio file not found" if not Path(path).is_dir() else
                               "is a folder; give audio files", path)
        try:  # the header only (~0.1 ms a file)
            sf.info(str(path))
        except Exception:
            from salmonn_export.audio import load_clip

            load_clip(path)  # raises the loader's own one-line error


def audio_or_demo(audio: list[Path] | None, task: str, explicit: bool, what: str) -> list[Path]:
    """The given files (checked by `check_audio_files`), or the demo clips when running the demo default."""
    if audio:
        check_audio_files(audio)
        return audio
    if explicit:
        raise SalmonnError(f"give audio files (demo clips exist only for the demo {what})")
    from salmonn_export.model.demo import demo_clips

    return demo_clips(task)


def stream_texts(audio: list[Path], batch_size: int, transcribe: Callable[[list[Path]], list[str]], as_json: bool,
                 info: dict, seconds_key: str) -> None:
    """Run `transcribe` batch by batch and print one `file<TAB>text` line per file as its batch
    finishes (repr() when the text has unprintable characters); with `as_json`, one JSON document
    when all are done: `info`, `seconds_key` (wall seconds) and `results` [{audio, text, dropped_seconds}]
    in order. Audio past the model's 30 s window gets a `warning:` line on stderr (`warn_dropped_audio`)."""
    start = time.perf_counter()
    results = []
    for first in range(0, len(audio), batch_size):
        batch = audio[first:first + batch_size]
        for a, t in zip(batch, transcribe(batch)):
            results.append({"audio": str(a), "text": t, "dropped_seconds": warn_dropped_audio(a)})
            if not as_json:
                name = str(a) if str(a).isprintable() else repr(str(a))  # a tab or newline in a name would split the line
                sys.stdout.write(f"{name}\t{t!r}\n" if not t.isprintable() else f"{name}\t{t}\n")
                sys.stdout.flush()
    if as_json:
        info = {**info, seconds_key: round(time.perf_counter() - start, 3), "results": results}
        print(json.dumps(info, indent=1, ensure_ascii=False))


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
