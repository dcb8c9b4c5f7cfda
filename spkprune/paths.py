"""Checks on output paths, made before any work: a long run must not end in a path it cannot write."""

from __future__ import annotations

import os
from pathlib import Path

from spkprune.errors import SpkpruneError


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """`path` can be (or become) a folder we write into; else one line naming `what` (e.g. `--out`)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SpkpruneError(f"{what} {str(path)!r} is a file, not a folder; choose another path")
    _check_parent(path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """`path` can be written as a file; else one line naming `what` (e.g. `--plot`)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SpkpruneError(f"{what} {str(path)!r} is a folder; give a file path")
    _check_parent(path, what)
    return path


def _check_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor must be a folder we may create entries in."""
    problem = why_unwritable(path)
    if problem:
        raise SpkpruneError(f"{what} {str(path)!r}: {problem}")


def why_unwritable(path: Path) -> str | None:
    """Why nothing can be created at `path` (judged by its nearest existing ancestor), or None when it can."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{str(ancestor)!r} is a file, so nothing can be written below it"
    # root may write anywhere by permission bits, but /proc and /sys hold no user files
    if not os.access(ancestor, os.W_OK | os.X_OK) or str(ancestor.resolve()).startswith(("/proc", "/sys")):
        return f"cannot write in {str(ancestor)!r} (permission denied)"
    return None


def save_png(figure, path: str | os.PathLike, **savefig) -> Path:
    """Write a matplotlib `figure` to `path` as PNG through a temporary file renamed into place (a reader never sees
    half a picture), then close it; returns the path."""
    import matplotlib.pyplot as plt  # only the plotting commands need matplotlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(figure)}.tmp")
    try:
        figure.savefig(tmp, format="png", **savefig)
        tmp.replace(path)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)
    return path
