"""The run record: what each stage of a recipe last did, kept in the store directory.

`<store>/recipe-runs/<recipe name>.json` maps each stage to its identity hash, status (`running` or `done`), the
outputs it wrote (store refs with their sha256, or an export folder) and its results (metrics, counts). It is
rewritten atomically (temp file, fsync, rename) after every change, so a crash leaves the previous version.
A lock file next to it keeps two `spkprune run` of the same recipe on the same store from interleaving.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from spkprune.errors import SpkpruneError

RUNS_DIR = "recipe-runs"
RECORD_VERSION = 1


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class RunRecord:
    path: Path
    recipe: dict = field(default_factory=dict)  # the resolved recipe of the last run
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, store_root: Path, name: str) -> "RunRecord":
        path = Path(store_root) / RUNS_DIR / f"{name}.json"
        if not path.is_file():
            return cls(path)
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SpkpruneError(
                f"recipe run record {path} is corrupt; delete it to re-run every stage of {name!r}"
            ) from None
        if doc.get("version", 0) > RECORD_VERSION:
            raise SpkpruneError(f"recipe run record {path} is from a newer spkprune; upgrade spkprune")
        return cls(path, doc.get("recipe", {}), doc.get("stages", {}))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": RECORD_VERSION, "updated": now(), "recipe": self.recipe, "stages": self.stages}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump(doc, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def stage(self, name: str) -> dict | None:
        return self.stages.get(name)

    def start(self, name: str, entry: dict) -> None:
        self.stages[name] = {**entry, "status": "running", "started": now()}
        self.save()

    def finish(self, name: str, outputs: dict, result: dict, seconds: float) -> None:
        entry = self.stages[name]
        entry.update(status="done", finished=now(), seconds=round(seconds, 3), outputs=outputs, result=result)
        self.save()


@contextmanager
def run_lock(store_root: Path, name: str) -> Iterator[None]:
    """Exclusive right to run recipe `name` on this store (released when the process ends, even by a crash)."""
    path = Path(store_root) / RUNS_DIR / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpkpruneError(
                f"another `spkprune run` of recipe {name!r} is using store {store_root}; wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)
