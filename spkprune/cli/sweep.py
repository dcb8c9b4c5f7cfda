"""`spkprune sweep report RECIPE`: a sweep's grid points in one table, a heat map and Pareto plots."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from spkprune.cli.app import DEFAULT_STORE, app, chosen_store_dir
from spkprune.cli.render import FORMATS, render_frame
from spkprune.recipes import load_recipe
from spkprune.recipes.sweep_report import sweep_report

sweep_app = typer.Typer(help="Sweeps (recipes with a sweep: grid): gather their points.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("report")
def report_command(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="The sweep recipe YAML file (see docs/recipes.md, Sweeps)."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="The key=value overrides the sweep was run with.", show_default=False,
    ),
    fmt: Literal[FORMATS] = typer.Option("table", "--format", help="Output: table, json, csv or md."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the PNG plots (default: STORE/plots).",
                                       show_default=False),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the heat map and the Pareto plots."),
) -> None:
    """One row per grid point: swept values, top-1, sparsity, keep, tokens, dense MACs, MACs, SOPs, energy and
    measured throughput; PNGs of top-1 over keep x sparsity and of top-1 against energy / throughput with the
    Pareto front. Only reads the run record and the store's artifacts."""
    resolved = load_recipe(recipe, overrides or [])
    store = chosen_store_dir(ctx) or Path(resolved.store or DEFAULT_STORE)
    report = sweep_report(resolved, store, out=out, plots=plots)
    shown = [str(path) for path in report.plots]
    extra = {"recipe": resolved.name, "store": str(store), "plots": shown}
    if fmt in ("table", "md"):
        extra = {"store": str(store), **({"plots": ", ".join(shown)} if shown else {})}
    render_frame(report.frame, fmt, title=f"sweep {resolved.name} ({len(report.frame)} points)", extra=extra)
