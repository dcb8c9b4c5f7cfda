"""`spkprune export REF --out DIR`: a Hub-ready folder, optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

import pandas as pd
import typer

from spkprune.cli.app import app, readable_store
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr
from spkprune.export.jobs import run_export
from spkprune.export.settings import ExportSettings


def _size(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB" if size < 1024**2 else f"{size / 1024**2:.2f} MiB"


@settings_command(app, "export", ExportSettings, presentation=())
def export_cmd(ctx: typer.Context, settings: ExportSettings) -> None:
    """Write a Hub-ready folder (weights, config.json, README.md model card) and optionally push it."""
    outcome = run_export(readable_store(ctx), settings)
    _render_export(outcome.export)
    if outcome.push is None:
        return
    target = settings.push_to_hub + (f"@{settings.revision}" if settings.revision else "")
    if settings.dry_run:
        total = sum(size for _, size in outcome.push.files)
        for name, size in outcome.push.files:
            stderr.print(f"would upload {name} ({_size(size)})")
        stderr.print(f"dry run: would upload {len(outcome.push.files)} files ({_size(total)}) to {target}; nothing was sent")
    else:
        stderr.print(f"pushed {len(outcome.push.files)} files to {target}: {outcome.push.commit_url}")


def _render_export(result) -> None:
    frame = pd.DataFrame([{"file": name, "bytes": size, "size": _size(size)} for name, size in result.files])
    extra = {"folder": str(result.folder), "format": f"{result.format} ({result.dtype})"}
    if result.sparsity is not None:
        extra["sparsity (prunable)"] = f"{100 * result.sparsity:.1f}%"
    if result.ratio is not None:
        extra["weights vs dense float32"] = f"{100 * result.ratio:.1f}% ({_size(result.weights_bytes)} of " \
                                            f"{_size(result.dense_float32_bytes)})"
    if result.dtype != "float32":
        extra["note"] = f"{result.dtype} is lossy: loading gives the {result.dtype}-rounded weights"
    render_frame(frame, "table", title=f"exported to {result.folder}", extra=extra)
