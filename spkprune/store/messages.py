"""The store's user-facing errors: one line each, saying what is wrong and what to do."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from spkprune.errors import SpkpruneError
from spkprune.store.refs import format_ref

NEW_DIR_HINT = "pass --store with a new or empty directory"


class IndexUnusable(SpkpruneError):
    """SQLite could not open or read the index (not a database, damaged, or not writable)."""

    def __init__(self, index_path: Path, err: sqlite3.Error):
        self.reason = str(err)
        super().__init__(f"the store index {index_path} cannot be used ({err})")


def exists_error(name: str, tag: str) -> SpkpruneError:
    return SpkpruneError(
        f"{format_ref(name, tag)} already exists in the store; choose another --name or tag, "
        f"or remove it first (spkprune rm {format_ref(name, tag)})"
    )


def unusable(root: Path, err: OSError) -> SpkpruneError:
    """A directory that cannot be listed or written (/proc/..., another user's) named as not a usable store."""
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(root) else ""
    return SpkpruneError(
        f"{root} is not a spkprune store this process can use: {reason}{where}; {NEW_DIR_HINT} you can write"
    )


def cannot_create(root: Path, reason: str) -> SpkpruneError:
    return SpkpruneError(f"cannot create a spkprune store at {root} ({reason}); {NEW_DIR_HINT} you can write")


def short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} (+{len(items) - limit} more; see spkprune ls)"
