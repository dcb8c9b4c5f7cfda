"""The store's SQLite index: schema, the format marker, and index rows turned into checked `Artifact`s."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from spkprune.errors import SpkpruneError
from spkprune.store.refs import format_ref

STORE_FORMAT = "spkprune.store"
STORE_VERSION = 1
INDEX_FILE = "index.sqlite"
BUSY_TIMEOUT_S = 120.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    created TEXT NOT NULL,
    parent TEXT,
    meta TEXT NOT NULL,
    PRIMARY KEY (name, tag)
);
CREATE INDEX IF NOT EXISTS artifacts_by_sha ON artifacts (sha256);
"""
COLUMNS = "name, tag, kind, sha256, size, created, parent, meta"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Artifact:
    """One index row: a named, tagged blob in the store."""

    name: str
    tag: str
    kind: str
    path: Path
    sha256: str
    size: int
    created: str
    parent: str | None
    meta: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.tag)


class CorruptRowError(SpkpruneError):
    """An index row that cannot be read (metadata that is not a JSON object, a malformed sha256 or size)."""

    def __init__(self, ref: str, index_path: Path, problem: str):
        self.ref = ref
        super().__init__(
            f"artifact {ref} has a corrupt index row in {index_path}: {problem}; "
            f"delete the tag (spkprune rm {ref}) and re-create it"
        )


def is_sha256(text) -> bool:
    """True for 64 lowercase hex digits: only such a value may become a blob path (never `../` from a bad row)."""
    return isinstance(text, str) and bool(_SHA256_RE.match(text))


def artifact_from_row(row: tuple, index_path: Path, blob_path: Callable[[str], Path]) -> Artifact:
    """The checked Artifact of an index row; CorruptRowError naming the row and what is wrong with it."""
    name, tag, kind, sha256, size, created, parent, meta = row
    ref = format_ref(name, tag)
    problem = _row_problem(sha256, size, meta)
    if problem:
        raise CorruptRowError(ref, index_path, problem)
    return Artifact(name, tag, kind, blob_path(sha256), sha256, int(size), created, parent, json.loads(meta))


def _row_problem(sha256, size, meta) -> str | None:
    if not is_sha256(sha256):
        return f"sha256 {str(sha256)[:80]!r} is not 64 hex digits"
    if not isinstance(size, int) or size < 0:
        return f"size {str(size)[:80]!r} is not a byte count"
    try:
        value = json.loads(meta)
    except (TypeError, ValueError) as err:
        return f"its metadata is not JSON ({' '.join(str(err).split())[:120]})"
    if not isinstance(value, dict):
        return f"its metadata is a JSON {type(value).__name__}, not an object"
    return None


def check_store_info(info: dict, root: Path) -> None:
    """SpkpruneError unless the index's `store_info` marks a store of a version this spkprune reads."""
    if info.get("format") != STORE_FORMAT:
        raise SpkpruneError(f"{root} is not a spkprune store (its index has format {info.get('format')!r})")
    version = str(info.get("version", "0"))
    if not version.isdigit():
        raise SpkpruneError(
            f"store {root} has an unreadable format version {version[:40]!r} in {INDEX_FILE} (expected a whole "
            f"number; this spkprune reads version {STORE_VERSION}); the index is damaged or not from spkprune"
        )
    if int(version) > STORE_VERSION:
        raise SpkpruneError(
            f"store {root} has version {version}; this spkprune reads version {STORE_VERSION}: upgrade spkprune"
        )


def tables(con: sqlite3.Connection) -> set[str]:
    return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def init_schema(con: sqlite3.Connection) -> None:
    _switch_to_wal(con)
    con.execute("BEGIN IMMEDIATE")
    try:
        for statement in filter(str.strip, SCHEMA.split(";")):
            con.execute(statement)
        con.executemany(
            "INSERT OR IGNORE INTO store_info (key, value) VALUES (?, ?)",
            [("format", STORE_FORMAT), ("version", str(STORE_VERSION)), ("created", now())],
        )
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _switch_to_wal(con: sqlite3.Connection) -> None:
    """Put the index in WAL mode, waiting for other processes that are creating the same store.

    The switch needs an exclusive lock, and SQLite answers a busy lock at once here, without the busy handler: two
    processes creating one store would otherwise see "database is locked" in the same millisecond.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            con.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
