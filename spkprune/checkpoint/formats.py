"""What the exported folder formats share: file names, format identifiers, mask packing and the one mask checksum,
a byte-reproducible safetensors writer, and small helpers (the formats themselves: folder.py, sparse.py)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_numpy

from spkprune.checkpoint.core import mask_mismatch
from spkprune.errors import SpkpruneError
from spkprune.store import fs

DENSE_FILE = "model.safetensors"
SPARSE_FILE = "model.sparse.safetensors"
MASKS_FILE = "masks.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"

SPARSE_FORMAT = "spkprune.sparse"
DENSE_FORMAT = "spkprune.dense"
MASKS_FORMAT = "spkprune.masks"
FORMAT_VERSION = "1"
BITORDER = "little"  # np.packbits bit order of every stored mask: element i is bit (i % 8) of byte i // 8
VALUE_DTYPES = ("float32", "float16")
CODECS = ("raw", "shuffle-zlib", "shuffle-xz")

NP_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8,
    "uint64": np.uint64, "uint32": np.uint32, "uint16": np.uint16, "uint8": np.uint8, "bool": np.bool_,
}


class LossyWeightsWarning(UserWarning):
    """Weights were stored in float16: loading gives the float16-rounded values, not the trained float32 ones."""


def corrupt(path: Path, why: str) -> SpkpruneError:
    return SpkpruneError(f"{path} is not a valid spkprune export ({why}); re-export it or download it again")


# ---------------------------------------------------------------------------------------------- masks


def pack_mask(mask: torch.Tensor) -> np.ndarray:
    """A bool mask as packed bits, row-major, little bit order (see BITORDER)."""
    return np.packbits(mask.detach().cpu().numpy().astype(bool).reshape(-1), bitorder=BITORDER)


def unpack_mask(bits: np.ndarray, numel: int) -> np.ndarray:
    return np.unpackbits(bits, count=numel, bitorder=BITORDER).astype(bool)


def mask_sha256(masks: Mapping[str, torch.Tensor]) -> str:
    """sha256 over `key UTF-8, 0x00, packed mask bytes` for every masked tensor in sorted key order.

    The one mask checksum of spkprune: exported files record it (docs/export.md), IMP records and compares it.
    Shapes are not hashed; every file records them beside the masks.
    """
    digest = hashlib.sha256()
    for key in sorted(masks):
        digest.update(key.encode() + b"\0")
        digest.update(pack_mask(masks[key]).tobytes())
    return digest.hexdigest()


def canonical_weights(state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict:
    """The state_dict with pruned positions set to +0.0, after checking every mask fits its weight.

    A pruned weight that is not zero means the checkpoint's weights and mask disagree; exporting it would
    change the model depending on the format, so it is refused.
    """
    out = {key: value.detach().cpu() for key, value in state_dict.items()}
    problem = mask_mismatch(masks, out)
    if problem:
        raise SpkpruneError(f"the checkpoint is inconsistent: {problem}")
    for key, mask in masks.items():
        weight = out[key]
        keep = mask.detach().cpu().to(torch.bool)
        if bool((weight[~keep] != 0).any()):
            raise SpkpruneError(
                f"weight {key!r} is nonzero where its mask prunes it; apply the mask (re-run the pruning step) before exporting"
            )
        out[key] = weight.masked_fill(~keep, 0.0)  # -0.0 -> +0.0 so both formats hold the same bytes
    return out


def check_float16_range(key: str, array: np.ndarray) -> None:
    with np.errstate(over="ignore"):
        overflow = np.isfinite(array) & ~np.isfinite(array.astype(np.float16))
    if np.any(overflow):
        raise SpkpruneError(f"tensor {key!r} has values beyond the float16 range; export with --dtype float32")



def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise SpkpruneError("bfloat16 weights cannot be exported yet; convert the checkpoint to float32 first")
    return tensor.detach().cpu().contiguous().numpy()


def jsonable(meta: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(meta, default=str))


def value_dtype(dtype: str):
    if dtype not in VALUE_DTYPES:
        raise SpkpruneError(f"unknown --dtype {dtype!r}; choose float32 or float16")
    return np.float16 if dtype == "float16" else None


def open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError, ValueError) as err:
        raise corrupt(path, f"unreadable safetensors: {str(err).splitlines()[0]}") from None


def json_field(path: Path, metadata: Mapping[str, str], name: str):
    try:
        return json.loads(metadata[name])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise corrupt(path, f"metadata field {name!r} is missing or not JSON") from None


def check_format(path: Path, metadata: Mapping[str, str] | None, expected: str) -> Mapping[str, str]:
    metadata = metadata or {}
    if metadata.get("format") != expected and metadata.get("spkprune_format") != expected:
        raise corrupt(path, f"expected format {expected!r}, found {metadata.get('format')!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise SpkpruneError(
            f"{path} uses {expected} version {metadata.get('format_version')!r}; this spkprune reads version "
            f"{FORMAT_VERSION}: upgrade spkprune"
        )
    return metadata


def note_lossy(path: Path, dtype: str) -> None:
    if dtype != "float32":
        warnings.warn(
            f"{path.name} stores weights in {dtype}: loaded weights are the {dtype}-rounded values (lossy export)",
            LossyWeightsWarning,
            stacklevel=3,
        )


def smallest_uint(max_value: int) -> type:
    """The narrowest unsigned integer dtype that holds `max_value`."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    raise SpkpruneError(f"index {max_value} does not fit in 64 bits")


def save_safetensors(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file whose bytes depend only on its content.

    safetensors writes `__metadata__` in hash-map order, which changes from call to call; the header is rewritten
    with the metadata keys sorted and the tensors in data order. Offsets are relative to the data, so they stay.
    """
    data = save_numpy(dict(arrays), metadata=dict(metadata))
    header = fs.parse_header(data)
    start = 8 + int.from_bytes(data[:8], "little")
    canonical = {"__metadata__": dict(sorted(fs.header_metadata(header).items()))}
    tensors = [(key, info) for key, info in header.items() if key != "__metadata__"]
    canonical.update(sorted(tensors, key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors lays it out
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        handle.write(memoryview(data)[start:])
    return path
