"""One error type for every problem a user can fix: it names the file and says what is wrong."""

from __future__ import annotations

from pathlib import Path


class SalmonnError(Exception):
    """A user-facing error. The CLI prints it on one line and exits non-zero."""

    def __init__(self, problem: str, path: str | Path | None = None):
        self.problem = problem
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class SalmonnWarning(UserWarning):
    """Something a user should know that does not stop the command; the CLI prints it as one
    `warning:` line on stderr (every other library warning is silenced there)."""


class SlowKernelWarning(SalmonnWarning):
    """The bundle runs on a path ONNX Runtime has no fast kernel for on this provider."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the CLI's handler so that every clean-up that runs on
    Ctrl-C (atomic folders removed, partial eval results kept for resuming) runs the same way."""
