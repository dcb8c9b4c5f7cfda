"""Checkpoints: a state_dict, its pruning masks and JSON metadata, saved to and loaded from any reference.

A reference is a store reference `NAME[@TAG]`, a `.safetensors` file (a spkprune blob or a plain state_dict), an
exported folder, or `hf://ORG/REPO[@REVISION]`. The blob format (see docs/store.md) is a self-describing safetensors
file: tensors under their state_dict keys, masks as bool under `__mask__.<key>`, and
`__metadata__ = {"format": "spkprune.checkpoint", "format_version": "1", "meta": json.dumps(meta)}`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

import torch

from spkprune.errors import SpkpruneError
from spkprune.store import Artifact, Store, is_store_ref, parse_ref
from spkprune.store import fs

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

FORMAT = "spkprune.checkpoint"
FORMAT_VERSION = "1"
MASK_PREFIX = "__mask__."
SELECTOR_PREFIX = "token_selectors."
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
PICKLE_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


@dataclass
class Checkpoint:
    """Weights (original Spikformer keys), bool masks for pruned tensors, JSON metadata, and where it came from."""

    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    ref: str | None = None

    @property
    def arch(self) -> str | None:
        return self.meta.get("arch")

    def validate(self) -> None:
        """ValueError unless every mask is bool, names a tensor of the state_dict and has its shape."""
        problem = mask_mismatch(self.masks, self.state_dict)
        if problem:
            raise ValueError(problem)
        for key, mask in self.masks.items():
            if mask.dtype != torch.bool:
                raise ValueError(f"mask {key!r} must be torch.bool, got {mask.dtype}")


def mask_mismatch(masks: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first mask that names no tensor of `tensors` or has another shape, as a message; None when all fit."""
    for key, mask in masks.items():
        if key not in tensors:
            return f"mask {key!r} matches no weight of the model"
        if tuple(mask.shape) != tuple(tensors[key].shape):
            return f"mask {key!r} has shape {list(mask.shape)}, its weight {list(tensors[key].shape)}"
    return None


# --------------------------------------------------------------------------------------------- blob format
def to_tensors(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and `__metadata__` of the blob that stores `ckpt`."""
    ckpt.validate()
    clash = [k for k in ckpt.state_dict if k.startswith(MASK_PREFIX)]
    if clash:
        raise ValueError(f"state_dict keys may not start with {MASK_PREFIX!r}: {clash[:3]}")
    tensors = dict(ckpt.state_dict)
    tensors.update({MASK_PREFIX + key: mask for key, mask in ckpt.masks.items()})
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": json.dumps(ckpt.meta, sort_keys=True)}
    return tensors, metadata


def from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], ref: str | None) -> Checkpoint:
    """Split a blob's tensors into state_dict and masks; a plain safetensors file gives empty metadata."""
    where = ref or "checkpoint"
    meta: dict = {}
    if metadata.get("format") == FORMAT:
        version = metadata.get("format_version", "")
        if not version.isdigit() or int(version) > int(FORMAT_VERSION):
            raise SpkpruneError(
                f"{where} has checkpoint format version {version!r}; this spkprune reads up to {FORMAT_VERSION}: "
                "upgrade spkprune"
            )
        try:
            meta = json.loads(metadata.get("meta") or "{}")
        except json.JSONDecodeError:
            raise SpkpruneError(f"{where} is corrupt: its metadata is not valid JSON") from None
    state_dict = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    ckpt = Checkpoint(state_dict, masks, meta, ref)
    try:
        ckpt.validate()
    except ValueError as err:
        raise SpkpruneError(f"{where} is corrupt: {err}") from None
    return ckpt


# ---------------------------------------------------------------------------------------------------- save
def save_checkpoint(
    store: Store,
    name: str,
    tag: str,
    ckpt: Checkpoint,
    *,
    parent: str | None = None,
    replace: bool = False,
    kind: str = "checkpoint",
) -> Artifact:
    """Store `ckpt` as NAME@TAG; records `parent`, the creation time and (when missing) its sparsity in `meta`."""
    meta = dict(ckpt.meta)
    parent = parent if parent is not None else meta.get("parent")
    meta["parent"] = parent
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    if "sparsity" not in meta and meta.get("arch"):
        keys = prunable_keys(meta)
        if keys is not None:
            meta["sparsity"] = sparsity_report(ckpt.state_dict, ckpt.masks, keys)
    tensors, metadata = to_tensors(Checkpoint(ckpt.state_dict, ckpt.masks, meta))
    return store.put(name, tag, tensors, metadata, meta, kind=kind, parent=parent, replace=replace)


# ---------------------------------------------------------------------------------------------------- load
def load_checkpoint(ref: str | os.PathLike, store: Store | None = None) -> Checkpoint:
    """Load a checkpoint from a store reference, a `.safetensors` file, an exported folder or `hf://ORG/REPO[@REV]`.

    `NAME` is a store reference unless it looks like a path (contains `/`, starts with `.` or `~`, or ends with a
    file suffix); a bare name that the store lacks but that exists on disk is read from disk.
    """
    text = os.fspath(ref)
    if text.startswith("hf://"):
        from spkprune.export.hub import download_ref

        return _read_folder(download_ref(text), text)
    path = Path(text).expanduser()
    if _looks_like_path(text) or not is_store_ref(text):
        return load_path(path)
    if store is not None and (store.exists(*parse_ref(text)) or not path.exists()):
        return load_artifact(store, store.resolve(text))
    if path.exists():
        return load_path(path)
    raise SpkpruneError(f"{text!r} is a store reference but no store is open; pass --store DIR")


def load_artifact(store: Store, art: Artifact) -> Checkpoint:
    tensors, metadata = store.read(art)
    return from_tensors(tensors, metadata, art.ref)


def load_path(path: Path) -> Checkpoint:
    """A checkpoint from a `.safetensors` file or an exported folder."""
    if path.is_dir():
        return _read_folder(path, str(path))
    tensors, metadata = read_safetensors_file(path)
    return from_tensors(tensors, metadata, str(path))


def _read_folder(folder: Path, ref: str) -> Checkpoint:
    from spkprune.export.formats import read_folder

    ckpt = read_folder(Path(folder))
    ckpt.ref = ref
    return ckpt


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or os.sep in text
        or text.startswith((".", "~"))
        or text.endswith(".safetensors")
        or text.endswith(PICKLE_SUFFIXES)
    )


def read_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, __metadata__) of a safetensors file; one clear SpkpruneError naming the file otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise SpkpruneError(f"{path} does not exist: give NAME[@TAG], a .safetensors file, a folder or hf://ORG/REPO")
    if path.name.endswith(PICKLE_SUFFIXES):
        raise SpkpruneError(
            f"{path} is a pickled PyTorch checkpoint, not safetensors; bring it into the store first with "
            f"`spkprune import {path} --arch PRESET --name NAME`"
        )
    data = path.read_bytes()
    try:
        header = fs.parse_header(data)
        tensors = load(data)
    except (ValueError, SafetensorError) as err:
        raise SpkpruneError(f"{path} is not a valid safetensors file: {err}") from None
    return tensors, fs.header_metadata(header)


# ----------------------------------------------------------------------------------------------- models
def build_model(ckpt: Checkpoint, arch: str | None = None) -> "nn.Module":
    """The model of `ckpt` with its weights loaded strictly (token selectors attached first when present).

    `arch` names the preset for a checkpoint without metadata (a plain state_dict): the `--arch` option.
    """
    where = ckpt.ref or "the checkpoint"
    arch = arch or ckpt.meta.get("arch")
    if not arch:
        raise SpkpruneError(f"{where} carries no architecture (a plain state_dict); pass --arch PRESET")
    model = _model_for(arch, ckpt.meta.get("config") if ckpt.meta.get("arch") == arch else None)
    selector = ckpt.meta.get("selector")
    if any(k.startswith(SELECTOR_PREFIX) for k in ckpt.state_dict) and not selector:
        raise SpkpruneError(f"{where} has token_selectors.* weights but no selector configuration in its metadata")
    if selector:  # firing-rate and random selectors have no weights: their configuration alone brings them back
        from spkprune.models.selector import attach_selectors

        attach_selectors(model, selector)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except SpkpruneError as err:
        raise SpkpruneError(f"{where}: {err}") from None
    return model


def _model_for(arch: str, config: dict | None) -> "nn.Module":
    from spkprune.models import PRESETS, create_model, model_from_config

    if arch not in PRESETS and config:
        return model_from_config(config, preset=arch)
    if not config:
        return create_model(arch)
    base = PRESETS[arch].to_dict()
    overrides = {k: v for k, v in config.items() if k not in base or base[k] != v}
    return create_model(arch, **overrides)


def model_from_ref(ref: str, store: Store | None = None, arch: str | None = None) -> "nn.Module":
    """`build_model(load_checkpoint(ref, store))`."""
    return build_model(load_checkpoint(ref, store), arch=arch)


def prunable_keys(meta: dict) -> list[str] | None:
    """The prunable weight keys of `meta["arch"]` (a weightless skeleton on the meta device); None if unknown."""
    try:
        with torch.device("meta"):
            model = _model_for(meta["arch"], meta.get("config"))
    except SpkpruneError:
        return None
    return list(model.prunable_weights())


# -------------------------------------------------------------------------------------------- sparsity
def is_buffer_key(key: str) -> bool:
    """BatchNorm running statistics: state, not parameters (they never count towards sparsity)."""
    return key.endswith(BUFFER_SUFFIXES)


def sparsity_report(
    state_dict: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    prunable_keys: Iterable[str],
) -> dict:
    """Fraction of weights removed by `masks`, over the prunable weights and over all parameters.

    A weight counts as pruned when its mask is False; a weight that training left at exactly zero does not.
    `total` covers every parameter (the unused LayerNorms included), never BatchNorm buffers.
    """
    keys = list(prunable_keys)
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"prunable keys missing from the state_dict: {missing[:3]}")
    pruned = {k: int(m.numel() - int(m.sum())) for k, m in masks.items()}
    prunable_count = sum(state_dict[k].numel() for k in keys)
    prunable_pruned = sum(pruned.get(k, 0) for k in keys)
    params = [k for k in state_dict if not is_buffer_key(k)]
    total_count = sum(state_dict[k].numel() for k in params)
    total_pruned = sum(pruned.get(k, 0) for k in params)
    return {
        "prunable": prunable_pruned / prunable_count if prunable_count else 0.0,
        "total": total_pruned / total_count if total_count else 0.0,
        "remaining_prunable": prunable_count - prunable_pruned,
        "remaining_total": total_count - total_pruned,
    }


def natural_key(key: str) -> list:
    """Sort key that puts `block.10` after `block.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def tensor_summary(ckpt: Checkpoint) -> list[dict]:
    """One row per tensor: key, shape, dtype, numel, exact zeros, pruned (mask False) and pruned fraction."""
    rows = []
    for key in sorted(ckpt.state_dict, key=natural_key):
        value = ckpt.state_dict[key]
        mask = ckpt.masks.get(key)
        pruned = int(mask.numel() - int(mask.sum())) if mask is not None else None
        rows.append(
            {
                "key": key,
                "shape": "x".join(str(d) for d in value.shape) or "scalar",
                "dtype": str(value.dtype).replace("torch.", ""),
                "numel": value.numel(),
                "zeros": int((value == 0).sum()),
                "pruned": pruned,
                "sparsity": pruned / value.numel() if pruned is not None and value.numel() else None,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------- import
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
        with torch.serialization.safe_globals([argparse.Namespace]):
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
    from spkprune.models import create_model

    path = Path(path).expanduser()
    state_dict, info = read_original_checkpoint(path)
    model = create_model(arch)
    try:
        model.load_state_dict(state_dict, strict=True)
    except SpkpruneError as err:
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
