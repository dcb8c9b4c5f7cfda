"""The compact sparse format, `model.sparse.safetensors` (specified in docs/export.md, "The sparse format").

A safetensors file with a handful of 1-D "sections" and a table. The table lists every state_dict tensor in
order as `[key, shape, dtype, encoding]`; reading walks it once, taking each tensor's pieces from the front
of the sections it uses:

- `dense`   tensors that are not pruned: `numel` elements from `dense.<dtype>`;
- `bitmask` pruned tensors: `ceil(numel / 8)` bytes of packed mask from `bitmask`, then popcount values;
- `csr`     pruned tensors (rows = shape[0]): `rows + 1` offsets from `csr_crow`, then nnz column
            indices from `csr_col`, then nnz values;

where values come from `values` in row-major order. Each section is stored raw or, when smaller,
byte-shuffled and zlib-compressed. The mask is the true mask: a kept weight that happens to be zero is
stored as an explicit 0.0 value, never confused with a pruned one.
"""

from __future__ import annotations

import base64
import json
import lzma
import math
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from spkprune.checkpoint.formats import (
    BITORDER,
    CODECS,
    FORMAT_VERSION,
    NP_DTYPES,
    SPARSE_FORMAT,
    canonical_weights,
    check_float16_range,
    check_format,
    corrupt,
    json_field,
    jsonable,
    mask_sha256,
    note_lossy,
    open_safetensors,
    save_safetensors,
    smallest_uint,
    to_numpy,
    value_dtype,
)
from spkprune.errors import SpkpruneError

ENCODINGS = ("dense", "bitmask", "csr")
# Meta entries that are not copied into the weights file: the flops report lives in the model card.
_META_LEFT_OUT = ("flops",)
# Meta entries stored as fields of their own (`config` holds arch, config and selector); `meta` holds the rest.
_META_FIELDS = ("sparsity", "metrics", "recipe")
_CONFIG_KEYS = ("arch", "config", "selector")


def shuffle_bytes(array: np.ndarray) -> bytes:
    """Byte-shuffle a 1-D array: every element's byte 0, then every byte 1, ... (little-endian elements)."""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return little.view(np.uint8).reshape(-1, array.dtype.itemsize).T.tobytes()


def unshuffle_bytes(data: bytes, dtype, count: int) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    planes = np.frombuffer(data, dtype=np.uint8).reshape(itemsize, count)
    return planes.T.copy().view(np.dtype(dtype).newbyteorder("<")).reshape(count).astype(dtype)


_COMPRESSORS = {
    "shuffle-zlib": lambda data: zlib.compress(data, 9),
    "shuffle-xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
}
_DECOMPRESSORS = {"shuffle-zlib": zlib.decompress, "shuffle-xz": lzma.decompress}


def encode_section(array: np.ndarray) -> tuple[dict, np.ndarray]:
    """(section entry, stored array): raw, or the smallest of the byte-shuffled zlib / xz streams."""
    array = np.ascontiguousarray(array.reshape(-1))
    entry = {"dtype": array.dtype.name, "count": int(array.size)}
    shuffled = shuffle_bytes(array)
    codec, packed = min(((c, compress(shuffled)) for c, compress in _COMPRESSORS.items()), key=lambda c: len(c[1]))
    if len(packed) < array.nbytes:
        return {**entry, "codec": codec}, np.frombuffer(packed, dtype=np.uint8)
    return {**entry, "codec": "raw"}, array


def decode_section(path: Path, name: str, entry: Any, stored: np.ndarray) -> np.ndarray:
    try:
        dtype, count, codec = NP_DTYPES[entry["dtype"]], int(entry["count"]), entry["codec"]
    except (KeyError, TypeError, ValueError):
        raise corrupt(path, f"section {name!r} has a malformed entry {entry!r}") from None
    if codec not in CODECS:
        raise corrupt(path, f"section {name!r} has unknown codec {codec!r}")
    if codec == "raw":
        if stored.dtype != dtype or stored.size != count:
            raise corrupt(path, f"section {name!r} holds {stored.size} {stored.dtype}, expected {count} {dtype.__name__}")
        return stored.reshape(-1)
    try:
        data = _DECOMPRESSORS[codec](stored.tobytes())
    except (zlib.error, lzma.LZMAError):
        raise corrupt(path, f"section {name!r} does not decompress") from None
    if len(data) != count * np.dtype(dtype).itemsize:
        raise corrupt(path, f"section {name!r} decompresses to {len(data)} bytes, not {count} {dtype.__name__}")
    return unshuffle_bytes(data, dtype, count)


# ---------------------------------------------------------------------------------------------- writing


def csr_arrays(keep: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets and column indices of the kept positions, rows = shape[0], columns = the rest flattened."""
    rows = shape[0] if len(shape) else 1
    grid = keep.reshape(rows, -1)
    crow = np.concatenate([[0], np.cumsum(grid.sum(axis=1))])
    return crow.astype(np.int64), np.nonzero(grid)[1].astype(np.int64)


def _choose_encoding(keep: np.ndarray, shape) -> str:
    """CSR when its index bytes (smallest sufficient dtypes) are fewer than the packed bitmask's."""
    if keep.size == 0 or not len(shape):
        return "bitmask"
    nnz, rows = int(keep.sum()), shape[0]
    cols = keep.size // rows
    csr_bytes = (rows + 1) * np.dtype(smallest_uint(nnz)).itemsize + nnz * np.dtype(smallest_uint(cols - 1)).itemsize
    return "csr" if csr_bytes < math.ceil(keep.size / 8) else "bitmask"


class _Sections:
    """Accumulates the pieces of each section in table order."""

    def __init__(self) -> None:
        self.pieces: dict[str, list[np.ndarray]] = {}

    def add(self, name: str, array: np.ndarray) -> None:
        self.pieces.setdefault(name, []).append(array.reshape(-1))

    def encoded(self) -> tuple[dict, dict[str, np.ndarray]]:
        entries, stored = {}, {}
        for name, pieces in self.pieces.items():
            array = np.concatenate(pieces)
            if name in ("csr_crow", "csr_col"):
                array = array.astype(smallest_uint(int(array.max(initial=0))))
            entries[name], stored[name] = encode_section(array)
        return entries, stored


def write_sparse(path: Path, state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any], dtype: str = "float32") -> Path:
    """Write `model.sparse.safetensors`. With dtype="float16" every floating-point value (kept weights and
    dense tensors) is stored as float16 (lossy, recorded); integer tensors are always exact."""
    cast = value_dtype(dtype)
    sections = _Sections()
    table = []
    for key, tensor in canonical_weights(state_dict, masks).items():
        array = to_numpy(tensor)
        logical = array.dtype.name
        if cast is not None and np.issubdtype(array.dtype, np.floating):
            check_float16_range(key, array)
            array = array.astype(cast)
        encoding = "dense"
        if key in masks:
            if not np.issubdtype(array.dtype, np.floating):
                raise SpkpruneError(f"pruned tensor {key!r} is {logical}; only floating-point weights can be pruned")
            keep = to_numpy(masks[key]).astype(bool).reshape(-1)
            encoding = _choose_encoding(keep, array.shape)
            _add_masked(sections, encoding, array, keep)
        else:
            sections.add(f"dense.{logical}", array)
        table.append([key, list(tensor.shape), logical, encoding])
    entries, stored = sections.encoded()
    metadata = {**_metadata(meta, masks, dtype), "sections": json.dumps(entries), "tensors": _pack_table(table)}
    return save_safetensors(path, stored, metadata)


def _add_masked(sections: _Sections, encoding: str, array: np.ndarray, keep: np.ndarray) -> None:
    if encoding == "csr":
        crow, col = csr_arrays(keep, array.shape)
        sections.add("csr_crow", crow)
        sections.add("csr_col", col)
    else:
        sections.add("bitmask", np.packbits(keep, bitorder=BITORDER))
    sections.add("values", array.reshape(-1)[keep])


def _pack_table(table: list) -> str:
    # The table repeats long key names; compressed it costs a fifth, which matters for small models.
    return base64.b64encode(zlib.compress(json.dumps(table).encode(), 9)).decode("ascii")


def _metadata(meta: Mapping[str, Any], masks: Mapping[str, torch.Tensor], dtype: str) -> dict[str, str]:
    config = {key: meta.get(key) for key in _CONFIG_KEYS}
    left_out = (*_META_LEFT_OUT, *_META_FIELDS, *_CONFIG_KEYS)
    kept_meta = {k: v for k, v in jsonable(meta).items() if k not in left_out}
    return {
        "format": SPARSE_FORMAT,
        "format_version": FORMAT_VERSION,
        "value_dtype": dtype,
        "lossy": "true" if dtype != "float32" else "false",
        "bitorder": BITORDER,
        "config": json.dumps(config),
        "sparsity": json.dumps(meta.get("sparsity")),
        "mask_sha256": mask_sha256(masks),
        "metrics": json.dumps(meta.get("metrics")),
        "recipe": json.dumps(meta.get("recipe")),
        "meta": json.dumps(kept_meta),
    }


# ---------------------------------------------------------------------------------------------- reading


class _Reader:
    """Hands out each section's elements front to back; a request past the end means a corrupt file."""

    def __init__(self, path: Path, sections: dict[str, np.ndarray]) -> None:
        self.path, self.sections = path, sections
        self.offsets = dict.fromkeys(sections, 0)

    def take(self, name: str, count: int, key: str) -> np.ndarray:
        if name not in self.sections:
            raise corrupt(self.path, f"{key!r} needs section {name!r}, which the file lacks")
        start = self.offsets[name]
        if count < 0 or start + count > self.sections[name].size:
            raise corrupt(self.path, f"section {name!r} ends before {key!r} (needs {count} more, "
                                     f"{self.sections[name].size - start} left)")
        self.offsets[name] = start + count
        return self.sections[name][start:start + count]

    def check_consumed(self) -> None:
        for name, offset in self.offsets.items():
            if offset != self.sections[name].size:
                raise corrupt(self.path, f"section {name!r} holds {self.sections[name].size} elements but the "
                                         f"tensors use {offset} (a mask and its values disagree)")


def _read_bitmask(reader: _Reader, key: str, numel: int) -> np.ndarray:
    bits = reader.take("bitmask", math.ceil(numel / 8), key)
    if numel % 8 and int(bits[-1]) >> (numel % 8):
        raise corrupt(reader.path, f"bitmask of {key!r} has padding bits set")
    return np.unpackbits(bits, count=numel, bitorder=BITORDER).astype(bool)


def _read_csr(reader: _Reader, key: str, shape: list[int]) -> np.ndarray:
    rows = shape[0]
    numel = math.prod(shape)
    cols = numel // rows if rows else 0
    crow = reader.take("csr_crow", rows + 1, key).astype(np.int64)
    if crow[0] != 0 or np.any(np.diff(crow) < 0):
        raise corrupt(reader.path, f"CSR row offsets of {key!r} do not rise from 0")
    col = reader.take("csr_col", int(crow[-1]), key).astype(np.int64)
    flat = np.repeat(np.arange(rows, dtype=np.int64), np.diff(crow)) * cols + col
    if np.any(col >= cols) or np.any(np.diff(flat) <= 0):
        raise corrupt(reader.path, f"CSR column indices of {key!r} are out of range, unsorted or repeated")
    keep = np.zeros(numel, dtype=bool)
    keep[flat] = True
    return keep


def _read_tensor(reader: _Reader, row: Any) -> tuple[str, np.ndarray, np.ndarray | None]:
    try:
        key, shape, dtype, encoding = row
        shape = [int(s) for s in shape]
        np_dtype = NP_DTYPES[dtype]
    except (TypeError, ValueError, KeyError):
        raise corrupt(reader.path, f"malformed table row {row!r}") from None
    if encoding not in ENCODINGS or (encoding == "csr" and not shape):
        raise corrupt(reader.path, f"{key!r} has unknown encoding {encoding!r}")
    numel = math.prod(shape)
    if encoding == "dense":
        return key, reader.take(f"dense.{dtype}", numel, key).astype(np_dtype).reshape(shape), None
    keep = _read_bitmask(reader, key, numel) if encoding == "bitmask" else _read_csr(reader, key, shape)
    dense = np.zeros(numel, dtype=np_dtype)
    dense[keep] = reader.take("values", int(keep.sum()), key).astype(np_dtype)
    return key, dense.reshape(shape), keep.reshape(shape)


def _full_meta(path: Path, metadata: Mapping[str, str]) -> dict:
    """The checkpoint metadata: `meta` plus the entries that have fields of their own."""
    meta = json_field(path, metadata, "meta")
    config = json_field(path, metadata, "config")
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise corrupt(path, "its meta and config fields must be JSON objects")
    for key in _CONFIG_KEYS:
        if config.get(key) is not None:
            meta[key] = config[key]
    for key in _META_FIELDS:
        value = json_field(path, metadata, key) if key in metadata else None
        if value is not None:
            meta[key] = value
    return meta


def _unpack_table(path: Path, text: str | None) -> list:
    try:
        table = json.loads(zlib.decompress(base64.b64decode(text or "", validate=True)))
    except (ValueError, zlib.error):
        raise corrupt(path, "the tensor table does not decode") from None
    if not isinstance(table, list):
        raise corrupt(path, "the tensor table is not a list")
    return table


def read_sparse(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(state_dict, masks, meta) of a sparse file; float32 files give bit-identical weights and exact masks.

    Warns with LossyWeightsWarning when the values were stored in float16.
    """
    path = Path(path)
    with open_safetensors(path) as handle:
        metadata = check_format(path, handle.metadata(), SPARSE_FORMAT)
        entries = json_field(path, metadata, "sections")
        if not isinstance(entries, dict) or set(handle.keys()) != set(entries):
            raise corrupt(path, f"stored tensors {sorted(handle.keys())} do not match the sections listed")
        sections = {name: decode_section(path, name, entry, handle.get_tensor(name)) for name, entry in entries.items()}
    meta = _full_meta(path, metadata)
    reader = _Reader(path, sections)
    state_dict, masks = {}, {}
    for row in _unpack_table(path, metadata.get("tensors")):
        key, array, keep = _read_tensor(reader, row)
        state_dict[key] = torch.from_numpy(array.copy())  # copy: a 0-d array must stay 0-d
        if keep is not None:
            masks[key] = torch.from_numpy(keep.copy())
    reader.check_consumed()
    if mask_sha256(masks) != metadata.get("mask_sha256"):
        raise corrupt(path, "the masks do not match mask_sha256")
    note_lossy(path, metadata.get("value_dtype", "float32"))
    return state_dict, masks, meta if isinstance(meta, dict) else {}
