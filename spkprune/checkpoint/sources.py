"""Where a reference's weights come from: the one place that resolves a checkpoint reference.

A reference is a store reference `NAME[@TAG]`, a `.safetensors` file (a spkprune blob or a plain state_dict), an
exported folder, or `hf://ORG/REPO[@REVISION]` (an exported folder on the Hugging Face Hub).
"""

from __future__ import annotations

import os
from pathlib import Path

from spkprune.checkpoint.blob import PICKLE_SUFFIXES, from_tensors, read_safetensors_file
from spkprune.checkpoint.core import Checkpoint
from spkprune.checkpoint.folder import read_folder
from spkprune.checkpoint.hub import HF_PREFIX, download_ref
from spkprune.errors import SpkpruneError
from spkprune.store import Artifact, Store, is_store_ref, parse_ref


def load_checkpoint(ref: str | os.PathLike, store: Store | None = None) -> Checkpoint:
    """Load a checkpoint from a store reference, a `.safetensors` file, an exported folder or `hf://ORG/REPO[@REV]`.

    `NAME` is a store reference unless it looks like a path (contains `/`, starts with `.` or `~`, or ends with a
    file suffix); a bare name that the store lacks but that exists on disk is read from disk.
    """
    text = os.fspath(ref)
    if text.startswith(HF_PREFIX):
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
