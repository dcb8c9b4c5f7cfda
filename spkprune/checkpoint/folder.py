"""Exported folders: dense `model.safetensors` (+ `masks.safetensors`), or `model.sparse.safetensors`, and config.json.

`read_folder` turns an exported folder back into a Checkpoint; the sparse format itself lives in sparse.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from spkprune.checkpoint.core import Checkpoint
from spkprune.checkpoint.formats import (  # noqa: F401  (re-exported: the public names of the formats)
    BITORDER,
    CONFIG_FILE,
    DENSE_FILE,
    DENSE_FORMAT,
    FORMAT_VERSION,
    MASKS_FILE,
    MASKS_FORMAT,
    SPARSE_FILE,
    SPARSE_FORMAT,
    LossyWeightsWarning,
    canonical_weights,
    check_float16_range,
    check_format,
    corrupt,
    json_field,
    jsonable,
    mask_sha256,
    note_lossy,
    open_safetensors,
    pack_mask,
    save_safetensors,
    to_numpy,
    unpack_mask,
    value_dtype,
)
from spkprune.checkpoint.sparse import read_sparse, write_sparse  # noqa: F401
from spkprune.errors import SpkpruneError
from spkprune.models import family_of_meta
from spkprune.version import __version__


# ---------------------------------------------------------------------------------------------- dense


def write_dense(path: Path, state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                meta: Mapping[str, Any], dtype: str = "float32") -> Path:
    """Write `model.safetensors`: exactly the state_dict (original key names), pruned weights as +0.0.

    The metadata keeps `format: pt` (what transformers and the Hub viewer expect) beside spkprune's fields.
    """
    cast = value_dtype(dtype)
    tensors = {}
    for key, tensor in canonical_weights(state_dict, masks).items():
        array = to_numpy(tensor)
        if cast is not None and np.issubdtype(array.dtype, np.floating):
            check_float16_range(key, array)
            array = array.astype(cast)
        tensors[key] = array
    metadata = {
        "format": "pt",
        "spkprune_format": DENSE_FORMAT,
        "format_version": FORMAT_VERSION,
        "value_dtype": dtype,
        "meta": json.dumps(jsonable(meta)),
    }
    return save_safetensors(path, tensors, metadata)


def write_masks(path: Path, masks: Mapping[str, torch.Tensor]) -> Path:
    """Write `masks.safetensors` beside a dense export: each mask as packed bits, so the exact mask survives."""
    shapes = {key: list(mask.shape) for key, mask in masks.items()}
    metadata = {
        "format": MASKS_FORMAT,
        "format_version": FORMAT_VERSION,
        "bitorder": BITORDER,
        "shapes": json.dumps(shapes),
        "mask_sha256": mask_sha256(masks),
    }
    return save_safetensors(path, {key: pack_mask(mask) for key, mask in masks.items()}, metadata)


def read_masks(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    with open_safetensors(path) as handle:
        metadata = check_format(path, handle.metadata(), MASKS_FORMAT)
        shapes = json_field(path, metadata, "shapes")
        masks = {}
        for key, shape in shapes.items():
            if key not in handle.keys():
                raise corrupt(path, f"mask {key!r} is missing")
            numel = math.prod(shape)
            bits = handle.get_tensor(key)
            if bits.dtype != np.uint8 or bits.size != math.ceil(numel / 8):
                raise corrupt(path, f"mask {key!r} has {bits.size} bytes, expected {math.ceil(numel / 8)}")
            masks[key] = torch.from_numpy(unpack_mask(bits, numel).reshape(shape))
    if mask_sha256(masks) != metadata.get("mask_sha256"):
        raise corrupt(path, "the masks do not match mask_sha256")
    return masks


def read_dense(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of a dense export, floating tensors as float32 (float16 files warn: lossy)."""
    path = Path(path)
    with open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
        state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    if metadata.get("spkprune_format") == DENSE_FORMAT:  # a plain state_dict from other tools has no version
        check_format(path, metadata, DENSE_FORMAT)
    meta = json_field(path, metadata, "meta") if "meta" in metadata else {}
    if not isinstance(meta, dict):
        raise corrupt(path, "its meta field must be a JSON object")
    dtype = metadata.get("value_dtype", "float32")
    out = {}
    for key, array in state_dict.items():
        if array.dtype == np.float16 and dtype == "float16":
            array = array.astype(np.float32)
        out[key] = torch.from_numpy(array.copy())  # copy: writable, and a 0-d array stays 0-d
    note_lossy(path, dtype)
    return out, meta


# ---------------------------------------------------------------------------------------------- folders


def folder_config(meta: Mapping[str, Any], fmt: str, dtype: str, has_masks: bool) -> dict:
    """The content of `config.json`: what the folder holds and how to build the model."""
    return {
        "library_name": "spkprune",
        "spkprune_version": __version__,
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "weights_file": SPARSE_FILE if fmt == "sparse" else DENSE_FILE,
        "masks_file": MASKS_FILE if fmt == "dense" and has_masks else None,
        "dtype": dtype,
        "family": getattr(family_of_meta(meta), "name", None),  # spikformer, sdt, qkformer (spkprune list-models)
        "preset": meta.get("arch"),
        "config": meta.get("config"),
        "selector": meta.get("selector"),
        "sparsity": meta.get("sparsity"),
        "metrics": meta.get("metrics"),
    }


def write_weights(folder: Path, state_dict, masks, meta, fmt: str = "dense", dtype: str = "float32") -> dict:
    """Write the weight file(s) and config.json of an export into `folder`; returns the config written."""
    if fmt not in ("dense", "sparse"):
        raise SpkpruneError(f"unknown export format {fmt!r}; choose dense or sparse")
    config = folder_config(meta, fmt, dtype, has_masks=bool(masks))
    if fmt == "sparse":
        write_sparse(folder / SPARSE_FILE, state_dict, masks, meta, dtype)
    else:
        write_dense(folder / DENSE_FILE, state_dict, masks, meta, dtype)
        if masks:
            write_masks(folder / MASKS_FILE, masks)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpkpruneError(f"{folder} is not an spkprune export: it has no {CONFIG_FILE}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise SpkpruneError(f"{path} is not valid JSON ({err}); re-export or download it again") from None
    if not isinstance(config, dict) or config.get("format") not in ("dense", "sparse"):
        raise SpkpruneError(f"{path} does not name a format (dense or sparse); is this an spkprune export?")
    if config.get("format_version") != FORMAT_VERSION:
        raise SpkpruneError(
            f"{path} has export format version {config.get('format_version')!r}; this spkprune reads version "
            f"{FORMAT_VERSION}: upgrade spkprune"
        )
    return config


def weight_files(config: Mapping[str, Any]) -> list[str]:
    """The files besides config.json and README.md that an export with this config consists of."""
    files = [SPARSE_FILE if config["format"] == "sparse" else DENSE_FILE]
    if config.get("masks_file"):
        files.append(MASKS_FILE)
    return files


def read_folder(path: str | Path) -> Checkpoint:
    """An exported folder (dense or sparse) as a Checkpoint, with exact masks where the export recorded them.

    A dense folder without masks.safetensors (an unpruned model) loads with no masks.
    """
    folder = Path(path)
    config = read_config(folder)
    for name in weight_files(config):
        if not (folder / name).is_file():
            raise SpkpruneError(f"{folder} is incomplete: {name} is missing; re-export or download it again")
    if config["format"] == "sparse":
        state_dict, masks, meta = read_sparse(folder / SPARSE_FILE)
    else:
        state_dict, meta = read_dense(folder / DENSE_FILE)
        masks = read_masks(folder / MASKS_FILE) if config.get("masks_file") else {}
        for key, mask in masks.items():
            if key not in state_dict or tuple(state_dict[key].shape) != tuple(mask.shape):
                raise SpkpruneError(f"{folder}: mask {key!r} does not match the weights; re-export it")
    meta = dict(meta)
    for key, field in (("arch", "preset"), ("config", "config"), ("selector", "selector")):
        meta.setdefault(key, config.get(field))
    meta["export"] = {"format": config["format"], "dtype": config.get("dtype", "float32"),
                      "lossy": config.get("dtype", "float32") != "float32"}
    return Checkpoint(state_dict=state_dict, masks=masks, meta=meta, ref=str(folder))
