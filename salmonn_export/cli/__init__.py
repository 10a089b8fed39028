"""The `salmonn-export` command line: parse flags, call one function per command, print.

`app` is the entry point (`salmonn_export.cli:app`, `python cli.py`). Shared pieces live in
`common`; each command group's commands in its own module, registered on `app` when imported:
`model` (tiny, inspect, generate, convert-whisper), `build` (recipes, build), `engine` (run,
verify, bench), `harness` (eval, score, validate-submission, merge, demo-data), `serve`.
"""

# Importing a command module registers its commands on `app`, in this order in `--help`.
from salmonn_export.cli import model  # noqa: I001, F401
from salmonn_export.cli import build  # noqa: F401
from salmonn_export.cli import engine  # noqa: F401
from salmonn_export.cli import harness  # noqa: F401
from salmonn_export.cli import serve  # noqa: F401
from salmonn_export.cli.common import app

__all__ = ["app"]
