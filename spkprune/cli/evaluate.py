"""`spkprune evaluate REF`: test accuracy, loss and the firing rate of every neuron site."""

from __future__ import annotations

from typing import Optional

import pandas as pd
import typer

from spkprune.cli.app import app, store_dir
from spkprune.cli.render import check_format, render_frame, stderr


@app.command("evaluate")
def evaluate_command(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Checkpoint: NAME[@TAG], a .safetensors file, an exported folder or hf://ORG/REPO."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Data set (default: the one the checkpoint was trained on)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local data root (default: the checkpoint's)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Evaluation batch size."),
    compile: bool = typer.Option(
        False, "--compile", help="Fuse every neuron into one torch.compile kernel: same results, faster on large "
        "models and data sets, about 10 s to compile first."),
    fmt: str = typer.Option("table", "--format", help="Output: table, json, csv or md."),
) -> None:
    """Evaluate a checkpoint on a test split: top-1, top-5, loss and the firing rate of every neuron site.

    With token selectors, also the tokens each block keeps."""
    from spkprune.training.evaluate import evaluate_checkpoint

    check_format(fmt)
    report = evaluate_checkpoint(
        ref, store_dir(ctx), dataset=dataset, data_dir=data_dir, batch_size=batch_size, compile=compile
    )
    rows = pd.DataFrame(
        [{"site": site, "firing_rate": rate} for site, rate in report["firing"].items()], columns=["site", "firing_rate"]
    )
    summary = {k: report[k] for k in ("ref", "dataset", "samples", "top1", "top5", "loss", "tokens_per_block")}
    if fmt in ("table", "md"):
        stderr.print(f"evaluated {report['ref']} on {report['dataset']} test ({report['samples']} samples)")
    render_frame(rows, fmt, title=f"{report['ref']} firing rates", extra=summary)
