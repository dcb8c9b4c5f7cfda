"""Importing original Spikformer checkpoints (`.pth`, `.pth.tar`, `.safetensors`) safely into the store."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import warnings
from pathlib import Path

import torch

from spkprune.checkpoint.blob import from_tensors, read_safetensors_file
from spkprune.checkpoint.core import Checkpoint
from spkprune.checkpoint.saving import save_checkpoint
from spkprune.errors import SpkpruneError
from spkprune.models import check_state_dict_family, create_model
from spkprune.store import Artifact, Store, parse_ref


def read_original_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state_dict inside an original Spikformer checkpoint, plus where it was found.

    `.pth` / `.pth.tar` go through `torch.load(weights_only=True)` (timm's CheckpointSaver dict with `state_dict`,
    the DVS script's dict with `model`, or a bare state_dict); `.safetensors` through safetensors. A DDP `module.`
    prefix is stripped when every key has it. Anything that is not a plain tensor dictionary is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise SpkpruneError(f"{path} does not exist or is not a file: give a .pth, .pth.tar or .safetensors checkpoint")
    if path.name.endswith(".safetensors"):
        tensors, metadata = read_safetensors_file(path)
        ckpt = from_tensors(tensors, metadata, str(path))
        return _strip_ddp(ckpt.state_dict), {"format": "safetensors", "entry": None, "masks": ckpt.masks}
    obj = _torch_load(path)
    state_dict, entry = _find_state_dict(obj, path)
    info = {"format": "pth", "entry": entry, "masks": {}}
    if isinstance(obj, dict) and isinstance(obj.get("epoch"), int):
        info["epoch"] = obj["epoch"]
    return _strip_ddp(state_dict), info


def _torch_load(path: Path):
    # The original training scripts store their argparse options next to the weights; a Namespace holds plain
    # values and constructing one runs no code, so it is the one extra type allowed.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns (two stderr lines) about any pickle protocol but 2; our one-line refusal says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        text = str(err)
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            raise SpkpruneError(
                f"{path} is not a plain tensor dictionary: it pickles GLOBAL {refused.group(1)}, which spkprune "
                "refuses to load (weights_only); save model.state_dict() with torch.save or as safetensors"
            ) from None
        if "WeightsUnpickler error:" in text:  # torch's long advice text around the actual reason
            text = text.split("WeightsUnpickler error:", 1)[1]
        first = text.strip().splitlines()[0] if text.strip() else err.__class__.__name__
        raise SpkpruneError(f"{path} is not a readable PyTorch checkpoint (truncated or another format): {first[:160]}") from None


def _find_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(obj, dict):
        raise SpkpruneError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _tensor_dict(obj, path, None), None
    for entry in ("state_dict", "model"):
        if isinstance(obj.get(entry), dict):
            return _tensor_dict(obj[entry], path, entry), entry
    keys = ", ".join(str(k) for k in list(obj)[:8])
    raise SpkpruneError(
        f"{path} has no state_dict: expected a tensor dictionary or a dict with a 'state_dict' or 'model' entry, "
        f"found keys: {keys}"
    )


def _tensor_dict(obj: dict, path: Path, entry: str | None) -> dict[str, torch.Tensor]:
    where = f"{path}['{entry}']" if entry else str(path)
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not obj:
        detail = f"non-tensor entries: {', '.join(bad[:3])}" if bad else "it is empty"
        raise SpkpruneError(f"{where} is not a plain tensor dictionary ({detail})")
    return {k: v.contiguous() for k, v in obj.items()}


def _strip_ddp(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "module."
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def prepare_import(path: str | os.PathLike, arch: str) -> Checkpoint:
    """An original checkpoint as a Checkpoint for preset `arch`, validated by strict loading (keys and shapes)."""
    path = Path(path).expanduser()
    state_dict, info = read_original_checkpoint(path)
    model = create_model(arch)
    try:
        model.load_state_dict(state_dict, strict=True)
    except SpkpruneError as err:
        check_state_dict_family(model, state_dict, str(path))  # another family's weights: one line naming both
        raise SpkpruneError(f"{path}: {err}") from None
    source = {"path": str(path.resolve()), "sha256": _file_sha256(path), "format": info["format"], "entry": info["entry"]}
    if "epoch" in info:
        source["epoch"] = info["epoch"]
    meta = {"arch": arch, "config": model.config.to_dict(), "selector": None, "source": source}
    return Checkpoint(state_dict, info["masks"], meta, str(path))


def import_checkpoint(
    path: str | os.PathLike, arch: str, store: Store, name: str, tag: str = "main", replace: bool = False
) -> Artifact:
    """Validate an original checkpoint against preset `arch` and save it as NAME@TAG."""
    parse_ref(f"{name}@{tag}")  # a bad name fails before any work
    if not replace and store.exists(name, tag):
        raise SpkpruneError(f"{name}@{tag} already exists in the store; choose another --name or pass --overwrite")
    return save_checkpoint(store, name, tag, prepare_import(path, arch), replace=replace)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
