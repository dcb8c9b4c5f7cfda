"""`spkprune train`: train a Spikformer preset on a data set and save NAME, NAME@init and per-epoch checkpoints."""

from __future__ import annotations

from typing import Optional

import pandas as pd
import torch
import typer

from spkprune.checkpoint import natural_key
from spkprune.cli.app import app, store_dir
from spkprune.cli.render import check_format, render_frame, stderr
from spkprune.errors import SpkpruneError
from spkprune.store import Store


def _epoch_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SpkpruneError(f"--keep-epochs {text!r}: give comma-separated epoch numbers, e.g. 1,2,3") from None
    if any(v < 1 for v in values):
        raise SpkpruneError(f"--keep-epochs {text!r}: epochs count from 1")
    return values


@app.command("train")
def train_command(
    ctx: typer.Context,
    arch: Optional[str] = typer.Option(None, "--arch", help="Model preset, e.g. spikformer-2-64-digits (default: the data set's usual preset)."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="digits (embedded), cifar10, cifar100, cifar10-dvs or dvs128-gesture (default digits)."
    ),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Local data root (every data set but digits)."),
    name: str = typer.Option(..., "--name", help="Name of the run in the store: NAME, NAME@init, NAME@epoch-K."),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", help="Epochs of the cosine schedule (default: the data set's recipe); the recipe's cooldown epochs come on top."
    ),
    cooldown_epochs: Optional[int] = typer.Option(
        None, "--cooldown-epochs", help="Epochs at the minimum learning rate after the cosine (CIFAR and DVS recipes: 10, digits: 0)."
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size per process."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of AdamW."),
    timesteps: Optional[int] = typer.Option(None, "--timesteps", help="Override the preset's time steps T."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of initialisation, shuffling and augmentation."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from this checkpoint's weights (and masks) instead of a fresh initialisation."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run NAME from its last finished epoch."),
    keep_epochs: str = typer.Option(
        "1,2,3", "--keep-epochs", help="Epoch checkpoints kept for late rewinding (the last one is always kept)."
    ),
    save_iter: list[int] = typer.Option([], "--save-iter", help="Also save the weights after optimiser step K as NAME@iter-K (repeatable)."),
    limit_batches: Optional[int] = typer.Option(None, "--limit-batches", help="Train on only this many batches per epoch (smoke tests)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads per process for PyTorch (default: PyTorch's; 1 is fastest for tiny models on a busy machine)."
    ),
    compile: bool = typer.Option(False, "--compile", help="Run the fused BatchNorm + LIF kernels through "
                                 "torch.compile (a few seconds per layer shape on first use, cached on disk; "
                                 "faster steps on large models)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live progress bars on stderr."),
    fmt: str = typer.Option("table", "--format", help="Output: table, json, csv or md."),
) -> None:
    """Train a model and save it with its initial weights (NAME@init) for lottery-ticket rewinding.

    AdamW, warm-up + cosine schedule, label smoothing, mixup, AMP on GPU. Resumable with --resume; several
    processes with `torchrun --nproc_per_node N -m spkprune train ...`."""
    from spkprune.data import dataset_info
    from spkprune.training import TrainConfig, distributed
    from spkprune.training.runner import resume_in_store, train_to_store

    check_format(fmt)
    if threads is not None:
        if threads < 1:
            raise SpkpruneError("--threads must be >= 1")
        torch.set_num_threads(threads)
    overrides = {
        "dataset": dataset, "data_dir": data_dir, "epochs": epochs, "cooldown_epochs": cooldown_epochs, "batch_size": batch_size, "lr": lr,
        "timesteps": timesteps, "seed": seed, "limit_train_batches": limit_batches, "num_workers": workers,
        "compile": compile or None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    store = Store.open(store_dir(ctx))
    info = distributed.init_distributed()
    try:
        if resume:
            if arch or init:
                raise SpkpruneError("--resume continues NAME as it was started; drop --arch and --init")
            outcome = resume_in_store(store, name, overrides=overrides, progress=progress)
        else:
            cfg = TrainConfig.for_dataset(overrides.pop("dataset", "digits"), **overrides)
            if arch is None and init is None:
                arch = dataset_info(cfg.dataset).default_preset
            outcome = train_to_store(
                store, name, cfg, arch=arch, init=init, keep_epochs=_epoch_list(keep_epochs),
                save_iters=tuple(save_iter), progress=progress,
            )
    finally:
        distributed.shutdown()
    if not info.is_main:
        return
    if outcome.result is None:
        stderr.print(f"{name} has already finished training; nothing to do")
    elif outcome.resumed_from_epoch is not None:
        stderr.print(f"resumed {name} after epoch {outcome.resumed_from_epoch}")
    _report(store, name, outcome, fmt)


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
