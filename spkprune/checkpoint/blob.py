"""The spkprune blob, the store's file format: one self-describing safetensors file per Checkpoint.

Tensors under their state_dict keys, masks as bool under `__mask__.<key>`, and
`__metadata__ = {"format": "spkprune.checkpoint", "format_version": "1", "meta": json.dumps(meta)}`
(docs/store.md). A plain safetensors state_dict reads as a Checkpoint without masks or metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from spkprune.checkpoint.core import Checkpoint
from spkprune.errors import SpkpruneError
from spkprune.store import fs

FORMAT = "spkprune.checkpoint"
FORMAT_VERSION = "1"
MASK_PREFIX = "__mask__."
PICKLE_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


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
    meta = _blob_meta(metadata, where) if metadata.get("format") == FORMAT else {}
    state_dict = {k: v for k, v in tensors.items() if not k.startswith(MASK_PREFIX)}
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    ckpt = Checkpoint(state_dict, masks, meta, ref)
    try:
        ckpt.validate()
    except ValueError as err:
        raise SpkpruneError(f"{where} is corrupt: {err}") from None
    return ckpt


def _blob_meta(metadata: Mapping[str, str], where: str) -> dict:
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
    if not isinstance(meta, dict):
        raise SpkpruneError(f"{where} is corrupt: its metadata is {_json_kind(meta)}, not a JSON object")
    return meta


def _json_kind(value) -> str:
    if value is None or isinstance(value, bool):
        return f"JSON {json.dumps(value)}"
    return {list: "a JSON array", str: "a JSON string"}.get(type(value), "a JSON number")


def read_safetensors_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, __metadata__) of a safetensors file; one clear SpkpruneError naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise SpkpruneError(f"{str(path)!r} does not exist: give NAME[@TAG], a .safetensors file, a folder or hf://ORG/REPO")
    if path.name.endswith(PICKLE_SUFFIXES):
        raise SpkpruneError(
            f"{path} is a pickled PyTorch checkpoint, not safetensors; bring it into the store first with "
            f"`spkprune import {path} --arch PRESET --name NAME`"
        )
    data = path.read_bytes()
    try:
        header = fs.parse_header(data)
        tensors = load_safetensors(data)
    except (ValueError, SafetensorError) as err:
        raise SpkpruneError(f"{path} is not a valid safetensors file: {err}") from None
    return tensors, fs.header_metadata(header)
