"""`spkprune imp`: lottery tickets by iterative magnitude pruning with rewinding, controls and resume."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from spkprune.cli.app import app, store_dir
from spkprune.cli.render import check_format, render_frame, stderr
from spkprune.errors import SpkpruneError
from spkprune.pruning.imp import CONTROLS, ImpSettings, describe, run_imp
from spkprune.store import Store

DEFAULT_TARGET = 0.9


@app.command("imp")
def imp_command(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Trained dense checkpoint NAME[@TAG] (its NAME@init is the rewind point)."),
    name: str = typer.Option(..., "--name", help="Name of the run: rounds are saved as NAME@round-0 ... NAME@round-N."),
    rounds: int = typer.Option(10, "--rounds", help="Pruning rounds N."),
    target: Optional[float] = typer.Option(
        None, "--target", help=f"Sparsity reached after round N over the eligible weights (default {DEFAULT_TARGET})."
    ),
    rate: Optional[float] = typer.Option(
        None, "--rate", help="Fraction of the surviving weights pruned per round (instead of --target)."
    ),
    scope: str = typer.Option("global", "--scope", help="global: one ranking over all weights; layerwise: per tensor."),
    exclude: List[str] = typer.Option(
        [], "--exclude", help="Glob over state_dict keys never pruned (repeatable), e.g. 'head.weight'."
    ),
    rewind: str = typer.Option("init", "--rewind", help="Rewind point: init, epoch:K or iter:K of the dense run."),
    epochs_per_round: Optional[int] = typer.Option(
        None, "--epochs-per-round", help="Retraining epochs per round (default: as many as the dense run)."
    ),
    control: str = typer.Option(
        "none", "--control", help="Also run a control: random-reinit (same masks, fresh init) or random-prune."
    ),
    search_timesteps: Optional[int] = typer.Option(
        None, "--search-timesteps", help="Early-time ticket: search masks at T' time steps, retrain the last round at full T."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the retraining (default: the dense run's)."),
    resume: bool = typer.Option(False, "--resume", help="Require an existing run NAME and continue it."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Where to write the PNG (default STORE/plots/NAME-imp.png)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live progress bars on stderr."),
    fmt: str = typer.Option("table", "--format", help="Output: table, json, csv or md."),
) -> None:
    """Find a lottery ticket: prune, rewind and retrain for N rounds; one artifact per round, resumable."""
    check_format(fmt)
    if control not in CONTROLS:
        raise SpkpruneError(f"unknown --control {control!r}; choose one of {', '.join(CONTROLS)}")
    if target is None and rate is None:
        target = DEFAULT_TARGET
    settings = ImpSettings(
        rounds=rounds, target=target, rate=rate, scope=scope, exclude=tuple(exclude), rewind=rewind,
        epochs_per_round=epochs_per_round, search_timesteps=search_timesteps, seed=seed,
    ).validate()
    path = store_dir(ctx)
    if not path.exists():
        raise SpkpruneError(f"no store at {path}; train a model first (spkprune train) or pass --store DIR")
    store = Store.open(path, create=False)
    from spkprune.training import distributed

    info = distributed.init_distributed()
    try:
        report = run_imp(
            store, ref, name, settings, control=control, resume=resume, progress=progress, plot=plot,
            log=lambda message: stderr.print(message, soft_wrap=True) if info.is_main else None,
        )
    finally:
        distributed.shutdown()
    if not info.is_main:
        return
    if report.nothing_to_do:
        stderr.print(f"{name}: every round is already in the store; nothing to do", soft_wrap=True)
    if report.plot is not None:
        stderr.print(f"plot: {report.plot}", soft_wrap=True)
    frame = _for_people(report.frame()) if fmt == "table" else report.frame()
    summary = describe(report)
    extra = summary if fmt == "json" else {"final ticket": summary["final"]}
    render_frame(frame, fmt, title=f"IMP {name}", extra=extra)


def _for_people(frame):
    """Percentages and short headers for the rich table (machines get the raw fractions)."""
    import pandas as pd

    pct = lambda v: f"{100 * v:.1f}%"
    return pd.DataFrame(
        {
            "round": frame["round"],
            "kind": frame["kind"],
            "sparsity (prunable)": frame["sparsity_prunable"].map(lambda v: f"{100 * v:.2f}%"),
            "sparsity (total)": frame["sparsity_total"].map(lambda v: f"{100 * v:.2f}%"),
            "weights left": frame["remaining_prunable"].map(lambda v: f"{v:,}"),
            "params left": frame["remaining_total"].map(lambda v: f"{v:,}"),
            "top-1": frame["top1"].map(pct),
            "vs round 0": frame["delta_top1"].map(lambda v: "" if pd.isna(v) else f"{100 * v:+.1f} pts"),
            "T": frame["timesteps"],
        }
    )
