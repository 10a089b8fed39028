"""A resumable, shareable store for the slow part of a quantized build.

At real size the LLM quantization stage dominates a build (challenge-1b on 2 cores: calibration
through Whisper-large ~4 min, reference log-probs ~2 min, GPTQ 1–6 min per decoder layer). This
store keeps, in one folder per key:

- `calibration/<key>/`: the calibration sequences and the merged LLM's reference log-probs, keyed by
  the model's files, the calibration data and the recipe's calibration settings;
- `gptq/<key>/`: each decoder layer's codes, scales and errors as soon as it is quantized, plus the
  hidden states after the last finished layer, keyed by the calibration key and the weight format
  (bits, group size, act-order, symmetry, damping; not the MatMulNBits accuracy level, which does
  not change the codes).

So an interrupted build resumes at the first unfinished layer, and recipes that share a weight
format share its layers: w4a16, w4a8 and w4a16-lmhead run GPTQ over the decoder stack once.
Resumed results are bit-identical to an uninterrupted run (tests/test_quant_cache.py): the
hidden states are stored in the dtype they were computed in and GPTQ is deterministic.

Every entry is written to a temporary name and renamed, so an interruption never leaves a partial
entry; a key folder that does not match what is asked is simply never read. Disk use: 1 byte per
quantized weight (≈1 GB for Llama-3.2-1B, 3 GB for 3B) plus the log-probs (positions × vocab × 4 B).
Delete the folder (or pass `--no-cache`) to start over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from salmonn_export.recipes import WeightQuant

CACHE_FORMAT = 1
# settings fields added after CACHE_FORMAT 1, with the value every earlier key implied: left out of a
# key while at that value, so adding an option does not orphan existing caches
ADDED_SETTINGS = {"source": "audio"}


def default_cache_dir() -> Path:
    """`quantization/` under the tool's cache folder (`$SALMONN_EXPORT_CACHE`, else the platform's user
    cache folder, ~/.cache/salmonn-export on Linux), beside the materialized demo model."""
    from salmonn_export.files import cache_root

    return cache_root() / "quantization"


def check_cache_dir(path: Path) -> Path:
    """Create the cache folder if needed and check that files can be written in it.
    Raises one SalmonnError naming `path` (a file, an unwritable or impossible place)."""
    from salmonn_export.errors import SalmonnError
    from salmonn_export.files import os_problem

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SalmonnError("is a file, not a folder (the quantization cache must be a folder)", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SalmonnError(f"cannot use it as the quantization cache: {os_problem(exc)}", path) from None
    return path


def digest(value: object) -> str:
    """sha256 (first 20 hex digits) of a JSON-serialisable value, keys sorted."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _save(obj: object, path: Path) -> str | None:
    """Write atomically; an OSError (disk full, permissions changed) is returned, not raised: a cache
    that cannot be written must not fail the build it was meant to speed up."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return f"{path}: {exc.strerror or exc}"
    return None


def _load(path: Path) -> object | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception:  # an unreadable entry (disk full earlier, another version) is recomputed
        return None


class LayerStore:
    """GPTQ's per-decoder-layer results for one (calibration, weight format) key.

    `layer_{i}.pt`: {name: (QuantizedLinear, errors)} for the Linears of decoder layer i;
    `hidden_{i}.pt`: the hidden states after layer i (quantized), one tensor per calibration sequence;
    `{module}.pt` for a Linear outside the stack (the lm_head). Only the newest hidden states are kept.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.write_error: str | None = None
        self.read: set[str] = set()  # entries read back (tests and the build report)

    @property
    def hits(self) -> int:
        return len(self.read)

    def load_layer(self, index: int, names: list[str]) -> dict | None:
        entry = _load(self.folder / f"layer_{index}.pt")
        if not isinstance(entry, dict) or sorted(entry) != sorted(names):
            return None
        self.read.add(f"layer_{index}")
        return entry

    def save_layer(self, index: int, entry: dict) -> None:
        self.write_error = _save(entry, self.folder / f"layer_{index}.pt") or self.write_error

    def load_module(self, name: str) -> tuple | None:
        entry = _load(self.folder / f"{name}.pt")
        if entry is not None:
            self.read.add(name)
        return entry

    def save_module(self, name: str, entry: tuple) -> None:
        self.write_error = _save(entry, self.folder / f"{name}.pt") or self.write_error

    def latest_hidden(self) -> tuple[int, list[torch.Tensor]] | None:
        """(i, hidden states after layer i) for the newest stored i, or None."""
        indices = sorted((int(p.stem.split("_")[1]) for p in self.folder.glob("hidden_*.pt")), reverse=True)
        for i in indices:
            hidden = _load(self.folder / f"hidden_{i}.pt")
            if isinstance(hidden, list):
                return i, hidden
        return None

    def save_hidden(self, index: int, hidden: list[torch.Tensor]) -> None:
        error = _save(hidden, self.folder / f"hidden_{index}.pt")
        self.write_error = error or self.write_error
        if error:
            return
        for old in self.folder.glob("hidden_*.pt"):
            if old.stem != f"hidden_{index}":
                old.unlink(missing_ok=True)


class QuantCache:
    """The cache root; `None` as root disables it (every method computes)."""

    def __init__(self, root: Path | None):
        self.root = None if root is None else Path(root).expanduser().resolve()
        self.used: dict[str, str] = {}  # what this build read or wrote, for its report

    def calibration_key(self, model_hashes: dict[str, str], data: dict, items: list[Path], settings: object) -> str:
        """Key of the calibration sequences: model files' sha256, the data record, every item's path,
        size and mtime, the calibration settings, and the torch version that computed them."""
        import transformers

        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else (str(p),) for p in items]
        return digest({"format": CACHE_FORMAT, "torch": torch.__version__,
                       "transformers": transformers.__version__, "model": model_hashes, "data": data,
                       "items": stats, "settings": {k: v for k, v in asdict(settings).items()
                                                    if ADDED_SETTINGS.get(k, object()) != v}})

    def cached(self, kind: str, key: str, make: Callable[[], object]) -> object:
        """`make()` once per (kind, key): read back when stored, else computed and stored."""
        if self.root is None or not key:
            return make()
        path = self.root / "calibration" / key / f"{kind}.pt"
        value = _load(path)
        self.used[kind] = "read" if value is not None else "written"
        if value is None:
            value = make()
            error = _save(value, path)
            if error:
                self.used[kind] = "not stored"
                self.used["write_error"] = error
        return value

    def layer_store(self, calibration_key: str, weights: WeightQuant) -> LayerStore | None:
        if self.root is None:
            return None
        fmt = {k: v for k, v in asdict(weights).items() if k != "accuracy_level"}
        store = LayerStore(self.root / "gptq" / digest({"calibration": calibration_key, "weights": fmt}))
        self.used["gptq"] = str(store.folder)
        return store
