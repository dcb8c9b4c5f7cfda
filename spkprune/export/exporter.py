"""`spkprune export`: a checkpoint reference -> a Hub-ready folder (weights, config.json, README.md).

The folder is written beside `out` in a hidden temporary folder `.NAME.tmp-PID-XXXXXXXX` and renamed into place
when complete; an `out` it replaces is first moved aside to `.NAME.old-PID-XXXXXXXX`. A killed export leaves
those behind: the next export to the same `out` removes the ones whose process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spkprune.checkpoint import in_model_order, load_checkpoint
from spkprune.checkpoint.folder import write_weights
from spkprune.checkpoint.formats import CARD_FILE
from spkprune.errors import SpkpruneError
from spkprune.export.card import model_card
from spkprune.export.hub import folder_files
from spkprune.store import fs, is_store_ref


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
    """One-line errors for an `out` that cannot become the export folder, before any work is done."""
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if existing != out and not existing.is_dir():
        raise SpkpruneError(f"--out {out} is inside {existing}, which is a file, not a folder; choose a folder path")
    if out.exists() and not out.is_dir():
        raise SpkpruneError(f"--out {out} is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SpkpruneError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")


def _lineage(ref: str, store) -> list[dict[str, Any]]:
    """(ref, meta) records from the root ancestor to `ref` when it is a store reference, else []."""
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
    new export is complete (it is written beside it first), so a failure leaves `out` as it was.

    The same checkpoint always gives the same bytes: tensors in the model's state_dict order, sorted metadata.
    """
    out = Path(out)
    check_out_dir(out, overwrite)
    remove_stale_temps(out, started=time.time())
    created = _make_parents(out.parent)
    tmp = _new_temp(out, "tmp")  # made before the work: an `out` nobody can write to fails here, in one line
    try:
        ckpt = in_model_order(load_checkpoint(ref, store))
        hub_ref = f"hf://{repo_id}" + (f"@{revision}" if revision else "") if repo_id else None
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
        _remove_empty(created)
        raise
    sparsity = (ckpt.meta.get("sparsity") or {}).get("prunable")
    return ExportResult(out, fmt, dtype, folder_files(out), sparsity, _dense_float32_bytes(ckpt.state_dict))


# ------------------------------------------------------------------------------------- folders beside `out`


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; returns the ones created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpkpruneError(f"cannot create {folder} for --out ({err.strerror}); choose another folder") from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (something else wrote there) or already gone: leave the rest too


def _new_temp(out: Path, kind: str) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    except OSError as err:
        raise SpkpruneError(
            f"cannot write in {out.parent} for --out {out} ({err.strerror}); choose another folder"
        ) from None


def _temp_pattern(out: Path) -> re.Pattern:
    # mkdtemp's random part is 8 characters of [a-z0-9_]; exports by older spkprune versions wrote no PID.
    return re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(?:(\d+)-)?[a-z0-9_]{{8}}")


def remove_stale_temps(out: Path, started: float) -> list[Path]:
    """Delete the temporary folders that killed exports to `out` left beside it; returns those deleted.

    A folder is stale when the process named in it is gone, or, for a folder without a PID, when it is older than
    `started` (this run). Folders of exports still running are left alone.
    """
    if not out.parent.is_dir():
        return []
    pattern = _temp_pattern(out)
    stale = []
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and _is_stale(path, match.group(1), started):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


def _is_stale(path: Path, pid: str | None, started: float) -> bool:
    if pid is not None:
        try:
            return not fs.pid_alive(int(pid))
        except OverflowError:  # no process can have a PID that large
            return True
    try:
        return path.stat().st_mtime < started
    except OSError:
        return False


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
        old = _new_temp(out, "old")
        os.rename(out, old / out.name)
    try:
        os.rename(new, out)
    except OSError:
        if old is not None:
            os.rename(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
