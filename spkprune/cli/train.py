"""`spkprune train`: train a preset on a data set and save NAME, NAME@init and per-epoch checkpoints."""

from __future__ import annotations

import pandas as pd
import typer

from spkprune.checkpoint import natural_key
from spkprune.cli.app import app, writable_store
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr
from spkprune.store import Store
from spkprune.training.jobs import run_train
from spkprune.training.settings import TrainSettings


@settings_command(app, "train", TrainSettings, presentation=("progress", "fmt"))
def train_command(ctx: typer.Context, settings: TrainSettings, progress: bool, fmt: str) -> None:
    """Train a model and save it with its initial weights (NAME@init) for lottery-ticket rewinding.

    AdamW, warm-up + cosine schedule, label smoothing, mixup, AMP on GPU. Resumable with --resume; several
    processes with `torchrun --nproc_per_node N -m spkprune train ...`."""
    store = writable_store(ctx)
    outcome = run_train(store, settings, progress=progress)
    if outcome.artifact is None:  # not the main process of a torchrun group
        return
    if outcome.result is None:
        stderr.print(f"{settings.name} has already finished training; nothing to do")
    elif outcome.resumed_from_epoch is not None:
        stderr.print(f"resumed {settings.name} after epoch {outcome.resumed_from_epoch}")
    _report(store, settings.name, outcome, fmt)


def _report(store: Store, name: str, outcome, fmt: str) -> None:
    art = outcome.artifact
    metrics = outcome.metrics
    rows = [{
        "name": art.ref, "arch": art.meta.get("arch"), "dataset": metrics.get("dataset"),
        "epochs": art.meta.get("epoch"), "top1": metrics.get("top1"), "top5": metrics.get("top5"),
        "loss": metrics.get("loss"),
        "seconds": round(outcome.result.seconds, 1) if outcome.result is not None else None,
    }]
    tags = ", ".join(sorted(store.tags(name), key=lambda t: (t != "init", t == "main", natural_key(t))))
    render_frame(pd.DataFrame(rows), fmt, title=f"trained {name}", extra={"saved": tags})
