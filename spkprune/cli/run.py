"""`spkprune run RECIPE.yaml [key=value ...]`: a whole pipeline from one YAML recipe, skipping finished stages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Literal, Optional

import typer
import yaml

from spkprune.cli.app import DEFAULT_STORE, app, chosen_store_dir
from spkprune.cli.render import FORMATS, render_frame, stderr
from spkprune.errors import SpkpruneError
from spkprune.recipes import load_recipe, plan, plan_frame, run_recipe, summary_frame
from spkprune.recipes.worker import run_in_workers


@app.command("run")
def run_command(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML file (see recipes/ and docs/recipes.md)."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides, typed by the stage settings: seed=1 imp.rounds=5 vars.keep=0.5",
        show_default=False,
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and show what would run or be skipped; run nothing."),
    show: bool = typer.Option(False, "--show", help="Print the resolved recipe (after overrides and ${...}) as YAML."),
    fmt: Literal[FORMATS] = typer.Option("table", "--format", help="Summary output: table, json, csv or md."),
    jobs: int = typer.Option(
        1, "--jobs", "-j", help="Stages to run at once, each in a worker process with its share of the cores "
        "(independent sweep points in parallel).",
    ),
) -> None:
    """Run a pipeline recipe: train -> imp -> select-tokens -> evaluate -> flops -> export, resumable.

    The store is --store, else $SPKPRUNE_STORE, else the recipe's `store`, else ./spkprune-store."""
    if jobs < 1:
        raise SpkpruneError(f"--jobs: must be >= 1 (got {jobs})")
    resolved = load_recipe(recipe, overrides or [])
    store = chosen_store_dir(ctx) or Path(resolved.store or DEFAULT_STORE)
    if show:
        sys.stdout.write(yaml.safe_dump(resolved.resolved, sort_keys=False))
        return
    if dry_run:
        render_frame(plan_frame(plan(resolved, store)), fmt, title=f"plan for {resolved.name} (store {store})")
        return
    report = run_in_workers(resolved, store, jobs, log=_log) if jobs > 1 else run_recipe(resolved, store, log=_log)
    plots = report.plots
    extra = {"recipe": resolved.name, "store": str(store), "plots": plots}
    if fmt == "table":
        extra = {"store": str(store), **({"plots": ", ".join(plots)} if plots else {})}
    render_frame(summary_frame(report), fmt, title=f"recipe {resolved.name}", extra=extra)


def _log(message: str) -> None:
    stderr.print(message, markup=False, highlight=False)
