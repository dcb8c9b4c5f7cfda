"""Small durable-file helpers: fsync a directory, write bytes fully, parse a safetensors header, orphan temp files."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import time
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save

# A safetensors file: 8-byte little-endian header length, a JSON header, then the raw tensor bytes.
_HEADER_LEN = struct.Struct("<Q")
MAX_HEADER = 100_000_000  # the limit the safetensors library itself enforces


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs the directory itself fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def parse_header(data: bytes) -> dict:
    """The JSON header of a safetensors byte string; ValueError (with the reason) when it is not one."""
    if len(data) < _HEADER_LEN.size:
        raise ValueError(f"only {len(data)} bytes, shorter than a safetensors header")
    (length,) = _HEADER_LEN.unpack_from(data)
    if length > MAX_HEADER or _HEADER_LEN.size + length > len(data):
        raise ValueError("header length points past the end of the file (truncated, or not safetensors)")
    try:
        header = json.loads(bytes(data[_HEADER_LEN.size : _HEADER_LEN.size + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"header is not JSON ({err.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    end = _HEADER_LEN.size + length
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise ValueError(f"tensor {key!r} has no data_offsets")
        if end + offsets[1] > len(data):
            raise ValueError(f"tensor {key!r} extends past the end of the file (truncated)")
    return header


def header_metadata(header: dict) -> dict[str, str]:
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tmp_is_orphan(tmp: Path, stale_s: float) -> bool:
    """True when the temp file's writer is gone: its lock is free and its pid dead, or the file is older than
    `stale_s` (the pid may have been reused)."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer holds it
        pid_text = tmp.name.split(".", 1)[0]
        writer_dead = not pid_text.isdigit() or not pid_alive(int(pid_text))
        # A live pid may be the writer between creating the file and locking it: keep the file unless it is old.
        return writer_dead or time.time() - os.fstat(fd).st_mtime > stale_s
    finally:
        os.close(fd)


def serialize_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """The safetensors bytes of `tensors` (moved to CPU, contiguous, shared memory copied) with string metadata."""
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"store.put expects tensors only; not tensors: {bad[:5]}")
    plain: dict = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel():
            value = value.clone()  # safetensors refuses tensors that share memory (tied weights, views)
        seen.add(value.untyped_storage().data_ptr())
        plain[key] = value
    return save(plain, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
