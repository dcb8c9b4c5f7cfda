"""`spkprune compact` as a library call: settings in, the compacted checkpoint in the store out."""

from __future__ import annotations

from dataclasses import dataclass

from spkprune.checkpoint import load_checkpoint, save_checkpoint
from spkprune.compact.compaction import Compaction, compact_checkpoint
from spkprune.compact.settings import CompactSettings
from spkprune.errors import SpkpruneError
from spkprune.models.families import family_of_meta, require
from spkprune.store import Artifact, Store, check_name, parse_ref


@dataclass
class CompactOutcome:
    artifact: Artifact  # NAME@main
    compaction: Compaction
    size_before: int | None  # bytes of the source's store blob (None when it is not in the store)

    @property
    def size_after(self) -> int:
        return self.artifact.size


def run_compact(store: Store, settings: CompactSettings) -> CompactOutcome:
    """Compact `settings.ref` into `settings.name` (checked before any work); the store is unchanged on any error."""
    check_name(settings.name)
    if store.exists(settings.name, "main") and not settings.overwrite:
        raise SpkpruneError(f"{settings.name}@main already exists in the store; choose another --name or pass "
                            "--overwrite")
    source = load_checkpoint(settings.ref, store)
    require(family_of_meta(source.meta), "channel_structures", "compact")
    compaction = compact_checkpoint(source)
    artifact = save_checkpoint(store, settings.name, "main", compaction.checkpoint, parent=source.ref,
                               replace=settings.overwrite)
    return CompactOutcome(artifact, compaction, _store_size(store, settings.ref))


def _store_size(store: Store, ref: str) -> int | None:
    try:
        name, tag = parse_ref(ref)
    except SpkpruneError:
        return None
    return store.resolve(f"{name}@{tag}").size if store.exists(name, tag) else None
