"""The PyTorch engine target: `build --target torch` bundles run on PyTorch (CPU or CUDA).

Separate from `runtime/` (which never imports torch). This package imports torch, the reference
model modules and the bundle format, never harness/serve/cli. `bundle_target` is torch-free so the
CLI can pick an engine from a manifest without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path


def bundle_target(bundle: str | Path) -> str:
    """A bundle's engine target from its manifest: `torch`, or `onnx` when the manifest names none
    (every bundle written before targets existed). Unreadable manifests read as `onnx` here and are
    reported by the engine that loads them."""
    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "onnx"
    return manifest.get("target", "onnx") if isinstance(manifest, dict) else "onnx"
