"""`spkprune export`: a checkpoint reference -> a Hub-ready folder (weights, config.json, README.md)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spkprune.errors import SpkpruneError
from spkprune.export.card import model_card
from spkprune.export.formats import write_weights
from spkprune.export.hub import CARD_FILE, folder_files


@dataclass
class ExportResult:
    folder: Path
    format: str
    dtype: str
    files: list[tuple[str, int]] = field(default_factory=list)
    sparsity: float | None = None
    dense_float32_bytes: int = 0  # the tensor bytes of the same state_dict in float32

    @property
    def weights_bytes(self) -> int:
        return sum(size for name, size in self.files if name.endswith(".safetensors"))

    @property
    def ratio(self) -> float | None:
        return self.weights_bytes / self.dense_float32_bytes if self.dense_float32_bytes else None


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SpkpruneError(f"--out {out} is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SpkpruneError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")


def _lineage(ref: str, store) -> list[dict[str, Any]]:
    """(ref, meta) records from the root ancestor to `ref` when it is a store reference, else []."""
    from spkprune.store import is_store_ref

    if store is None or not is_store_ref(ref):
        return []
    try:
        art = store.resolve(ref)
    except SpkpruneError:
        return []  # not in the store: load_checkpoint read it from disk
    chain, _ = store.lineage(art)
    return [{"ref": a.ref, "meta": a.meta} for a in reversed(chain)] + [{"ref": art.ref, "meta": art.meta}]


def _dense_float32_bytes(state_dict) -> int:
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in state_dict.values())


def _card_name(ref: str, repo_id: str | None) -> str:
    if repo_id:
        return repo_id.split("/")[-1]
    return Path(ref.rstrip("/")).name.replace("@", "-") or "spkprune-model"


def export_checkpoint(
    ref: str,
    out: str | os.PathLike,
    *,
    store=None,
    fmt: str = "dense",
    dtype: str = "float32",
    overwrite: bool = False,
    repo_id: str | None = None,
    revision: str | None = None,
) -> ExportResult:
    """Write the export of `ref` to `out`. An existing folder is replaced only when `overwrite`, and only once the
    new export is complete (it is written beside it first), so a failure leaves `out` as it was."""
    from spkprune.checkpoint import load_checkpoint

    out = Path(out)
    check_out_dir(out, overwrite)
    ckpt = load_checkpoint(ref, store)
    hub_ref = f"hf://{repo_id}" + (f"@{revision}" if revision else "") if repo_id else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_weights(tmp, ckpt.state_dict, ckpt.masks, ckpt.meta, fmt, dtype)
        card = model_card(
            ckpt.meta, name=_card_name(ref, repo_id), fmt=fmt, dtype=dtype, has_masks=bool(ckpt.masks),
            lineage=_lineage(ref, store), hub_ref=hub_ref,
        )
        (tmp / CARD_FILE).write_text(card)
        _ordinary_permissions(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sparsity = (ckpt.meta.get("sparsity") or {}).get("prunable")
    return ExportResult(out, fmt, dtype, folder_files(out), sparsity, _dense_float32_bytes(ckpt.state_dict))


def _ordinary_permissions(folder: Path) -> None:
    """The export is for sharing: give the temp folder (0700) and its files the modes the user's umask gives."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _swap_in(new: Path, out: Path) -> None:
    """Put the finished folder `new` at `out`, moving an old `out` aside first and deleting it last."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(new, out)
    except OSError:
        if old is not None:
            os.rename(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
