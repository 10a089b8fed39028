"""The demo model's engine bundle, built on first use: the default `--engine` of every command.

It lives in the harness (above export) because it builds: the reference model package only
materializes the demo SALMONN (`model/demo.py`), and the exporter turns it into a bundle here.
"""

from __future__ import annotations

from pathlib import Path

from salmonn_export.bundle import read_manifest, sha256_file
from salmonn_export.errors import SalmonnError
from salmonn_export.model.demo import cache_root, ensure_demo_model


def ensure_demo_bundle(recipe_name: str = "w4a16") -> Path:
    """The demo model's engine bundle for a recipe, built on first use beside the demo model.

    Rebuilt when missing, unreadable, or made from another demo checkpoint than the current one.
    Raises SalmonnError for an unknown recipe name.
    """
    from salmonn_export.export.build import BuildOptions, build_bundle
    from salmonn_export.recipes import load_recipe

    config = ensure_demo_model()
    bundle = cache_root() / "engines" / f"demo-{recipe_name}"
    try:
        manifest = read_manifest(bundle)
        if manifest["source"]["sha256"].get("ckpt") == sha256_file(config.parent / "checkpoint_best.pth"):
            return bundle
    except (SalmonnError, KeyError):
        pass
    build_bundle(config, load_recipe(recipe_name), BuildOptions(out=bundle, calib=config.parent / "audio", force=True))
    return bundle
