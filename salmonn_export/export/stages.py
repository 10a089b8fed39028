"""Build stage timing shared by both build targets (ONNX and torch); imports neither onnx nor torch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class StageLog:
    """Stage timings (seconds, by stage name); `on_stage(name)` / `on_progress(name, done, total)`
    let the CLI draw progress."""

    on_stage: Callable[[str], None] | None = None
    on_progress: Callable[[str, int, int], None] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.on_stage:
            self.on_stage(name)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 3)
