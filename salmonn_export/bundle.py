"""The engine bundle format: `manifest.json` — what a bundle is, how it was made, and how to check it.

Pure Python (no torch), below both layers that use it: the exporter writes bundles with it and
the runtime reads and checks them. The manifest
holds no timestamps or timings, so the same inputs and recipe give the same manifest; those go
to `build_report.json` beside it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from salmonn_export.errors import SalmonnError
from salmonn_export.files import atomic_write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HASHED_SUFFIXES = (".onnx", ".data", ".npy", ".json", ".engine", ".plan", ".yaml", ".txt")
UNHASHED = {MANIFEST, "build_report.json"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every bundle file except the manifest and the build report, by relative path."""
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in UNHASHED and not p.name.startswith(".")
    }


def write_json(path: Path, data: Any) -> None:
    """Write `data` as sorted, indented UTF-8 JSON, atomically (`files.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def read_manifest(bundle: str | Path, verify_hashes: bool = True) -> dict[str, Any]:
    """Load and check a bundle's manifest: format version, files present, hashes equal."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.exists():
        raise SalmonnError("engine bundle does not exist (build one with `salmonn-export build`)", bundle)
    if not path.is_file():
        raise SalmonnError("not an engine bundle (no manifest.json)", bundle)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SalmonnError(f"manifest.json is not valid JSON ({exc})", path) from None
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise SalmonnError("manifest.json has no format_version", path)
    if version > FORMAT_VERSION:
        tool = manifest.get("tool", {}).get("version", "?")
        raise SalmonnError(f"bundle format {version} was written by salmonn-export {tool}; this version reads "
                           f"format <= {FORMAT_VERSION}: upgrade salmonn-export", path)
    if version < FORMAT_VERSION:
        raise SalmonnError(f"bundle format {version} is older than this tool's {FORMAT_VERSION}: rebuild it", path)
    files = manifest.get("files", {})
    for rel, digest in files.items():
        f = bundle / rel
        if not f.is_file():
            raise SalmonnError(f"bundle file `{rel}` is missing", bundle)
        if verify_hashes and sha256_file(f) != digest:
            raise SalmonnError(f"bundle file `{rel}` was altered (sha256 differs from the manifest)", bundle)
    return manifest
