"""`spkprune export` as a library call: settings in, the written folder (and the push) out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spkprune.export.exporter import ExportResult, export_checkpoint
from spkprune.export.hub import push_folder
from spkprune.export.settings import ExportSettings
from spkprune.store import Store


@dataclass
class ExportOutcome:
    export: ExportResult
    push: Any = None  # hub.PushResult when pushed (or listed by a dry run)


def run_export(store: Store | None, settings: ExportSettings) -> ExportOutcome:
    """Write the folder, then push it when `settings.push_to_hub` is set."""
    result = export_checkpoint(
        settings.ref, settings.out, store=store, fmt=settings.format, dtype=settings.dtype,
        overwrite=settings.overwrite, repo_id=settings.push_to_hub, revision=settings.revision,
    )
    if settings.push_to_hub is None:
        return ExportOutcome(result)
    pushed = push_folder(
        result.folder, settings.push_to_hub, revision=settings.revision, private=settings.private,
        dry_run=settings.dry_run, commit_message=f"spkprune export of {settings.ref} ({settings.format}, {settings.dtype})",
    )
    return ExportOutcome(result, pushed)
