"""`spkprune evaluate REF`: test accuracy, loss and the firing rate of every neuron site."""

from __future__ import annotations

import pandas as pd
import typer

from spkprune.cli.app import app, readable_store
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr
from spkprune.training.jobs import run_evaluate
from spkprune.training.settings import EvaluateSettings


@settings_command(app, "evaluate", EvaluateSettings)
def evaluate_command(ctx: typer.Context, settings: EvaluateSettings, fmt: str) -> None:
    """Evaluate a checkpoint on a test split: top-1, top-5, loss and the firing rate of every neuron site.

    With token selectors, also the tokens each block keeps."""
    report = run_evaluate(readable_store(ctx), settings)
    rows = pd.DataFrame(
        [{"site": site, "firing_rate": rate} for site, rate in report["firing"].items()], columns=["site", "firing_rate"]
    )
    summary = {k: report[k] for k in ("ref", "dataset", "timesteps", "samples", "top1", "top5", "loss",
                                      "tokens_per_block")}
    if fmt in ("table", "md"):
        stderr.print(f"evaluated {report['ref']} on {report['dataset']} test ({report['samples']} samples)")
    render_frame(rows, fmt, title=f"{report['ref']} firing rates", extra=summary)
