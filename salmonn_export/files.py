"""Writing folders atomically: build in a temporary sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from salmonn_export.errors import SalmonnError


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success it replaces `out`, on any error
    (Ctrl-C included) it is removed and `out` is left as it was.

    Without `force`, an existing non-empty `out` is an error.
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SalmonnError(f"{what} already exists and is not empty (use --force to replace it)", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    except OSError as exc:
        raise SalmonnError(f"cannot write the {what} here ({exc.strerror})", out.parent) from None
    try:
        yield tmp
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{time.time_ns()}")
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
