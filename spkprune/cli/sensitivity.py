"""`spkprune sensitivity REF`: prune one layer, structure layer or selector location at a time, measure the drop."""

from __future__ import annotations

import typer

from spkprune.cli.app import app, readable_store
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr
from spkprune.sensitivity.jobs import run_sensitivity
from spkprune.sensitivity.settings import SensitivitySettings


@settings_command(app, "sensitivity", SensitivitySettings)
def sensitivity_command(ctx: typer.Context, settings: SensitivitySettings, fmt: str) -> None:
    """Prune one unit at a time (a layer's weights, a layer's heads or channels, or the tokens before one block) at
    each ratio, evaluate without retraining, and report the top-1 drop per unit and ratio; the scan is stored as
    NAME@sensitivity-OVER for imp --allocation sensitivity and select-tokens --keep-allocation sensitivity."""
    report = run_sensitivity(readable_store(ctx), settings, log=lambda message: stderr.print(message, soft_wrap=True))
    if report.plot is not None:
        stderr.print(f"plot: {report.plot}", soft_wrap=True)
    summary = report.summary()
    if fmt in ("json", "csv"):
        render_frame(report.frame(), fmt, extra=summary)
        return
    base = f"{100 * summary['base_top1']:.2f}%"
    render_frame(report.table(), fmt, title=f"top-1 drop (points) of {summary['source']} ({base} unpruned)",
                 extra={"stored": summary["stored"], "unpruned top-1": base, "images": summary["images"]})
