"""`spkprune imp`: lottery tickets by iterative magnitude pruning with rewinding, controls and resume."""

from __future__ import annotations

import pandas as pd
import typer

from spkprune.cli.app import app, store_dir
from spkprune.cli.options import settings_command
from spkprune.cli.render import render_frame, stderr
from spkprune.errors import SpkpruneError
from spkprune.pruning.imp import describe
from spkprune.pruning.jobs import run_imp_command
from spkprune.pruning.settings import ImpCommandSettings
from spkprune.store import Store
from spkprune.training.distributed import is_main_process


@settings_command(app, "imp", ImpCommandSettings, presentation=("progress", "fmt"))
def imp_command(ctx: typer.Context, settings: ImpCommandSettings, progress: bool, fmt: str) -> None:
    """Find a lottery ticket: prune, rewind and retrain for N rounds; one artifact per round, resumable."""
    store = Store.existing(store_dir(ctx))
    if store is None:
        raise SpkpruneError(f"no store at {store_dir(ctx)}; train a model first (spkprune train) or pass --store DIR")
    main = is_main_process()
    log = (lambda message: stderr.print(message, soft_wrap=True)) if main else (lambda message: None)
    report = run_imp_command(store, settings, progress=progress, log=log)
    if not main:
        return
    if report.nothing_to_do:
        stderr.print(f"{settings.name}: every round is already in the store; nothing to do", soft_wrap=True)
    if report.plot is not None:
        stderr.print(f"plot: {report.plot}", soft_wrap=True)
    frame = _for_people(report.frame()) if fmt == "table" else report.frame()
    summary = describe(report)
    extra = summary if fmt == "json" else {"final ticket": summary["final"]}
    render_frame(frame, fmt, title=f"IMP {settings.name}", extra=extra)


def _for_people(frame: pd.DataFrame) -> pd.DataFrame:
    """Percentages and short headers for the rich table (machines get the raw fractions)."""
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
