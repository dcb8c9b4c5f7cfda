"""The artifact store: an SQLite index plus content-addressed safetensors blobs.

Layout of a store directory::

    index.sqlite                      one row per NAME@TAG (kind, sha256, size, created, parent, meta JSON)
    blobs/<sha256[:2]>/<sha256>.safetensors
    tmp/<pid>.<random>.part           blobs being written (locked by their writer while it lives)

Crash safety: a blob is written to `tmp/`, fsynced, renamed into `blobs/` (and the directory fsynced) inside the
index's write transaction, and only then is the index row committed. A process killed at any point leaves either no
row (and at worst an unreferenced blob or temp file, cleaned later) or a row whose blob is complete on disk.
Writers serialise on SQLite's write lock (`BEGIN IMMEDIATE` with a busy timeout), so concurrent processes lose nothing.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import json
import os
import sqlite3
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import load

from spkprune.errors import SpkpruneError
from spkprune.paths import why_unwritable
from spkprune.store import fs
from spkprune.store.index import (
    BUSY_TIMEOUT_S, COLUMNS, INDEX_FILE, Artifact, CorruptRowError, artifact_from_row, check_store_info, init_schema,
    is_sha256, now, tables,
)
from spkprune.store.messages import NEW_DIR_HINT, IndexUnusable, cannot_create, exists_error, short_list, unusable
from spkprune.store.refs import check_name, check_tag, format_ref, parse_ref

__all__ = ["Artifact", "BLOB_DIR", "INDEX_FILE", "Store", "TMP_DIR"]

BLOB_DIR = "blobs"
TMP_DIR = "tmp"
TMP_SUFFIX = ".part"
STALE_TMP_S = 3600.0  # a temp file whose writer's pid was reused is removed after this long


class Store:
    """A store directory. Create with `Store.open(path)`; every method opens its own short SQLite connection."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.index_path = self.root / INDEX_FILE

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ----------------------------------------------------------------------------------------------- opening
    @classmethod
    def existing(cls, path: str | os.PathLike) -> "Store | None":
        """The store at `path` for reading, or None when nothing is there yet (a missing path or an empty
        directory): reading never creates a store."""
        root = Path(path).expanduser()
        try:
            if not root.exists() and why_unwritable(root):
                raise SpkpruneError(f"no spkprune store at {root}, and none can be made there: {why_unwritable(root)}")
            if not root.exists() or (root.is_dir() and not any(root.iterdir())):
                return None
        except OSError as err:
            raise unusable(root, err) from None
        return cls.open(root, create=False)

    @classmethod
    def open(cls, path: str | os.PathLike, create: bool = True) -> "Store":
        """Open the store at `path`; create it there when the path is missing or an empty directory."""
        root = Path(path).expanduser()
        try:
            return cls._open(root, create)
        except OSError as err:  # a directory that cannot be listed or written: /proc/..., another user's, ...
            raise unusable(root, err) from None

    @classmethod
    def _open(cls, root: Path, create: bool) -> "Store":
        if root.exists() and not root.is_dir():
            raise SpkpruneError(f"store path {root} is a file, not a store directory; pass --store DIR")
        store = cls(root)
        if not store.index_path.is_file():
            # Re-checked last: a process creating the store at the same moment writes index.sqlite first.
            if root.is_dir() and any(root.iterdir()) and not store.index_path.is_file():
                raise SpkpruneError(f"{root} exists and is not a spkprune store (no {INDEX_FILE}); {NEW_DIR_HINT}")
            if not create:
                raise SpkpruneError(f"no store at {root}; train or import a model first, or pass --store DIR")
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise cannot_create(root, err.strerror or str(err)) from None
            store._check_or_init(creating=True)  # creates index.sqlite before anything else in the directory
            fs.fsync_dir(root)
            fs.fsync_dir(root.parent)
        else:
            store._check_or_init(creating=False)
        (root / BLOB_DIR).mkdir(exist_ok=True)
        (root / TMP_DIR).mkdir(exist_ok=True)
        store.clean_tmp()
        return store

    def _check_or_init(self, creating: bool) -> None:
        try:
            with self._db() as con:
                found = tables(con)
                if not found:
                    init_schema(con)
                    found = tables(con)
                if "store_info" not in found or "artifacts" not in found:
                    raise SpkpruneError(
                        f"{self.index_path} is an SQLite file but not a spkprune store index; {NEW_DIR_HINT}"
                    )
                info = dict(con.execute("SELECT key, value FROM store_info").fetchall())
        except IndexUnusable as err:
            if creating:
                raise cannot_create(self.root, err.reason) from None
            raise SpkpruneError(
                f"{self.index_path} is not a spkprune store index ({err.reason}); {NEW_DIR_HINT}"
            ) from None
        check_store_info(info, self.root)

    # ------------------------------------------------------------------------------------------ connections
    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.index_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.DatabaseError as err:
            raise IndexUnusable(self.index_path, err) from None
        try:
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            con.execute("PRAGMA synchronous = FULL")
            yield con
        except sqlite3.OperationalError as err:
            if "locked" in str(err) or "busy" in str(err):
                raise SpkpruneError(
                    f"store {self.root} stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s; try again"
                ) from None
            raise IndexUnusable(self.index_path, err) from None
        except sqlite3.DatabaseError as err:
            raise IndexUnusable(self.index_path, err) from None
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the store's write lock (other writers wait, readers go on)."""
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -------------------------------------------------------------------------------------------- reading
    def _blob_path(self, sha256: str) -> Path:
        return self.root / BLOB_DIR / sha256[:2] / f"{sha256}.safetensors"

    def _artifact(self, row: tuple) -> Artifact:
        return artifact_from_row(row, self.index_path, self._blob_path)

    def get(self, name: str, tag: str = "main") -> Artifact | None:
        with self._db() as con:
            row = con.execute(
                f"SELECT {COLUMNS} FROM artifacts WHERE name = ? AND tag = ?", (name, tag)
            ).fetchone()
        return self._artifact(row) if row else None

    def exists(self, name: str, tag: str = "main") -> bool:
        return self.get(name, tag) is not None

    def list(self, name: str | None = None) -> list[Artifact]:
        """All artifacts (or those of one name), by name then creation time; CorruptRowError on a bad row."""
        arts, corrupt = self.scan(name)
        if corrupt:
            raise corrupt[0]
        return arts

    def scan(self, name: str | None = None) -> tuple[list[Artifact], list[CorruptRowError]]:
        """Like `list`, but a corrupt index row is returned as its error instead of failing the whole listing."""
        query = f"SELECT {COLUMNS} FROM artifacts"
        args: tuple = ()
        if name is not None:
            query, args = query + " WHERE name = ?", (name,)
        with self._db() as con:
            rows = con.execute(query + " ORDER BY name, created, tag", args).fetchall()
        arts, corrupt = [], []
        for row in rows:
            try:
                arts.append(self._artifact(row))
            except CorruptRowError as err:
                corrupt.append(err)
        return arts, corrupt

    def names(self) -> list[str]:
        with self._db() as con:
            return [row[0] for row in con.execute("SELECT DISTINCT name FROM artifacts ORDER BY name")]

    def tags(self, name: str) -> list[str]:
        with self._db() as con:
            rows = con.execute("SELECT tag FROM artifacts WHERE name = ? ORDER BY created, tag", (name,))
            return [row[0] for row in rows]

    def resolve(self, ref: str) -> Artifact:
        """The artifact for `NAME` (= `NAME@main`) or `NAME@TAG`; SpkpruneError naming what exists otherwise."""
        name, tag = parse_ref(ref)
        art = self.get(name, tag)
        if art is not None:
            return art
        tags = self.tags(name)
        if tags:
            raise SpkpruneError(f"{name!r} has no tag {tag!r} in store {self.root}; its tags: {short_list(tags)}")
        names = self.names()
        if not names:
            raise SpkpruneError(f"no artifact named {name!r}: store {self.root} is empty; train or import a model first")
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpkpruneError(
            f"no artifact named {name!r} in store {self.root}{hint}; known names: {short_list(names)}"
        )

    def lineage(self, art: Artifact) -> tuple[list[Artifact], str | None]:
        """Ancestors of `art` from its parent up to the root, and the first parent ref that is not in the store
        (a path, an hf:// reference or a deleted artifact), if the chain ends on one."""
        chain: list[Artifact] = []
        seen = {art.ref}
        parent = art.parent
        while parent:
            try:
                name, tag = parse_ref(parent)
            except SpkpruneError:
                return chain, parent
            found = self.get(name, tag)
            if found is None:
                return chain, parent
            if found.ref in seen:  # a replaced tag can point back into its own history
                break
            chain.append(found)
            seen.add(found.ref)
            parent = found.parent
        return chain, None

    def read_bytes(self, art: Artifact) -> bytes:
        """The blob's bytes after checking its size and sha256 against the index."""
        try:
            data = art.path.read_bytes()
        except FileNotFoundError:
            raise SpkpruneError(
                f"artifact {art.ref} is corrupt: its blob {art.path} is missing; re-create it or delete the tag "
                f"(spkprune rm {art.ref})"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != art.sha256:
            raise SpkpruneError(
                f"artifact {art.ref} is corrupt: sha256 mismatch (index {art.sha256[:16]}..., file {digest[:16]}..., "
                f"{len(data)} of {art.size} bytes) in {art.path}; re-create it or delete the tag (spkprune rm {art.ref})"
            )
        return data

    def read(self, art: Artifact) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, safetensors __metadata__) of a verified blob."""
        data = self.read_bytes(art)
        return load(data), fs.header_metadata(fs.parse_header(data))

    # -------------------------------------------------------------------------------------------- writing
    def put(
        self,
        name: str,
        tag: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        meta: dict | None = None,
        kind: str = "checkpoint",
        parent: str | None = None,
        replace: bool = False,
    ) -> Artifact:
        """Write `tensors` (+ string `metadata` in the file header) as NAME@TAG with `meta` in the index.

        SpkpruneError if NAME@TAG exists and `replace` is false; with `replace` the old row is swapped atomically.
        """
        check_name(name)
        check_tag(tag)
        if not kind:
            raise ValueError("kind must be a non-empty string")
        meta_json = json.dumps(meta or {}, sort_keys=True)
        if not replace and self.exists(name, tag):
            raise exists_error(name, tag)
        data = fs.serialize_tensors(tensors, metadata)
        sha256 = hashlib.sha256(data).hexdigest()
        created = now()
        old_sha = self._commit_blob(name, tag, data, sha256, replace, (kind, sha256, len(data), created, parent, meta_json))
        if old_sha and old_sha != sha256:
            self._drop_unreferenced([old_sha])
        return Artifact(name, tag, kind, self._blob_path(sha256), sha256, len(data), created, parent, json.loads(meta_json))

    def _commit_blob(self, name: str, tag: str, data: bytes, sha256: str, replace: bool, row: tuple) -> str | None:
        """Durably place the blob and commit its row; returns the sha256 of the row it replaced, if any."""
        tmp_dir = self.root / TMP_DIR
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / f"{os.getpid()}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # tells clean_tmp() in other processes that this file is alive
            fs.write_all(fd, data)
            os.fsync(fd)
            with self._write() as con:
                old = con.execute("SELECT sha256 FROM artifacts WHERE name = ? AND tag = ?", (name, tag)).fetchone()
                if old and not replace:
                    raise exists_error(name, tag)
                final = self._blob_path(sha256)
                if not final.parent.is_dir():
                    final.parent.mkdir(parents=True, exist_ok=True)
                    fs.fsync_dir(final.parent.parent)
                os.replace(tmp, final)
                fs.fsync_dir(final.parent)
                con.execute(
                    f"INSERT OR REPLACE INTO artifacts ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (name, tag, *row)
                )
            return old[0] if old else None
        finally:
            os.close(fd)
            tmp.unlink(missing_ok=True)

    def update_meta(self, ref: str, key: str, value) -> Artifact:
        """Set `meta[key] = value` on an artifact, in the index and in the blob's header alike.

        The blob is rewritten under the same NAME@TAG through `put` (so the update is as crash-safe as a save);
        lineage and kind are kept.
        """
        art = self.resolve(ref)
        tensors, metadata = self.read(art)
        meta = {**art.meta, key: value}
        if "meta" in metadata:  # a checkpoint blob carries its meta in the header too
            metadata = {**metadata, "meta": json.dumps(meta, sort_keys=True)}
        return self.put(art.name, art.tag, tensors, metadata, meta, kind=art.kind, parent=art.parent, replace=True)

    def delete(self, name: str, tag: str = "main") -> str:
        """Remove NAME@TAG from the index, then its blob if no other tag shares it; returns the removed ref.

        Works on a corrupt row too (its metadata is never parsed), so `spkprune rm` can clear one."""
        check_name(name)
        check_tag(tag)
        with self._write() as con:
            row = con.execute("SELECT sha256 FROM artifacts WHERE name = ? AND tag = ?", (name, tag)).fetchone()
            if row:
                con.execute("DELETE FROM artifacts WHERE name = ? AND tag = ?", (name, tag))
        if row is None:
            self.resolve(format_ref(name, tag))  # raises, naming what the store holds
            raise SpkpruneError(f"{format_ref(name, tag)} was created while being removed; try again")
        self._drop_unreferenced([row[0]])
        return format_ref(name, tag)

    def _drop_unreferenced(self, shas: list[str]) -> None:
        # Under the write lock: a put() renames blobs only while holding it, so "unreferenced" cannot race.
        with self._write() as con:
            for sha in filter(is_sha256, shas):  # a corrupt row's sha256 never becomes a path to unlink
                if not con.execute("SELECT 1 FROM artifacts WHERE sha256 = ? LIMIT 1", (sha,)).fetchone():
                    self._blob_path(sha).unlink(missing_ok=True)

    def gc(self) -> int:
        """Remove blobs no index row references (left by a crash between rename and commit) and dead temp files."""
        removed = self.clean_tmp()
        with self._write() as con:
            referenced = {row[0] for row in con.execute("SELECT DISTINCT sha256 FROM artifacts")}
            for blob in (self.root / BLOB_DIR).glob("*/*.safetensors"):
                if blob.stem not in referenced:
                    blob.unlink(missing_ok=True)
                    removed += 1
        return removed

    def clean_tmp(self) -> int:
        """Delete temp files whose writer is gone (its lock is free and its pid is dead, or the file is old)."""
        removed = 0
        for tmp in (self.root / TMP_DIR).glob(f"*{TMP_SUFFIX}"):
            if fs.tmp_is_orphan(tmp, STALE_TMP_S):
                try:
                    tmp.unlink(missing_ok=True)
                except PermissionError:  # a read-only store: leave the clean-up to a writer
                    continue
                removed += 1
        return removed
