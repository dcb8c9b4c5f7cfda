"""Saving a Checkpoint into the store as a blob, with its lineage, creation time and sparsity recorded."""

from __future__ import annotations

from datetime import datetime, timezone

from spkprune.checkpoint.blob import to_tensors
from spkprune.checkpoint.build import prunable_keys
from spkprune.checkpoint.core import Checkpoint
from spkprune.checkpoint.summary import sparsity_report
from spkprune.store import Artifact, Store


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
