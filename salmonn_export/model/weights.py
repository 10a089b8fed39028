"""Reading weight files with errors a user can act on (which file, what is wrong)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from salmonn_export.errors import SalmonnError

NOT_TORCH = "not a torch checkpoint (a zip/pickle file written by torch.save)"


def torch_load(path: str | Path, what: str) -> Any:
    """`torch.load(weights_only=True)` as the challenge does, with one-line errors.

    Any failure is reported from what the file is (empty, text, cut zip, ...): torch's own messages
    are long advice about `weights_only` that does not help and used to be cut mid-sentence.
    """
    path = Path(path)
    if not path.is_file():
        raise SalmonnError(f"{what} not found", path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # garbage input makes torch raise many kinds (EOF, Index, Runtime...)
        raise SalmonnError(f"not a readable {what}: {_unreadable_reason(path, exc)}", path) from None


def _unreadable_reason(path: Path, exc: Exception) -> str:
    """Why torch could not load `path`, in one complete, short sentence."""
    with path.open("rb") as f:
        head = f.read(64)
    if not head:
        return f"an empty file, {NOT_TORCH}"
    blocked = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
    if blocked and not blocked.group(1).startswith("torch."):
        return f"it holds a Python object ({blocked.group(1)}) that torch.load(weights_only=True) refuses"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return "truncated or damaged (its zip archive is incomplete)"
        return "damaged, or a zip archive that torch.save did not write"
    if head[0] == 0x80:
        return "truncated or damaged, or a pickle file that torch.save did not write"
    if b"\0" not in head:  # YAML, JSON, CSV...: a config given where the checkpoint belongs
        return f"a text file, {NOT_TORCH}"
    return NOT_TORCH


def read_hf_state_dict(folder: str | Path, what: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF model folder: single or sharded safetensors, or pytorch_model.bin."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SalmonnError(f"{what} folder not found (no model hub access: give a local folder)", folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    files: list[Path]
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise SalmonnError(f"bad safetensors index ({exc})", index) from None
        files = [folder / s for s in shards]
    elif (folder / "pytorch_model.bin").is_file():
        return torch_load(folder / "pytorch_model.bin", f"{what} weights")
    else:
        raise SalmonnError(f"{what} folder has no model.safetensors, index or pytorch_model.bin", folder)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise SalmonnError(f"{what} weight shard missing", f)
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise SalmonnError(f"unreadable safetensors ({str(exc).splitlines()[0][:160]})", f) from None
    return state


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, what: str) -> None:
    """Load a state dict requiring an exact key and shape match, naming any mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if extra:
        problems.append(f"unexpected keys {_few(extra)}")
    if bad:
        problems.append("shape mismatch " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:4]))
    if problems:
        raise SalmonnError(f"{what} does not match its config: " + "; ".join(problems), source)
    module.load_state_dict(state, strict=True)


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
