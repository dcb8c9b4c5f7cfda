"""`spkprune list-models`: the model families and their presets (dataset, input, time steps, parameters)."""

from __future__ import annotations

import json
import sys

import pandas as pd
import typer

from spkprune.cli.app import app
from spkprune.cli.render import check_format, render_frame
from spkprune.errors import SpkpruneError
from spkprune.models.families import FAMILIES, preset_rows

COLUMNS = ["family", "preset", "dataset", "input", "timesteps", "params"]


@app.command("list-models")
def list_models_command(
    pattern: str = typer.Argument(None, help="Only presets matching this glob pattern, e.g. '*digits*'."),
    family: str = typer.Option(None, "--family", help=f"Only this family: {', '.join(FAMILIES)}."),
    fmt: str = typer.Option("table", "--format", "-f", help="Output: table (for people), json, csv or md."),
) -> None:
    """List the model families and their presets: family, preset, dataset, input (CxHxW), time steps, parameters."""
    check_format(fmt)
    rows = preset_rows(pattern, family)
    if not rows:
        raise SpkpruneError(f"no preset matches {pattern!r}" + (f" in the {family} family" if family else ""))
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if fmt == "table":
        frame["params"] = frame["params"].map("{:,}".format)
    render_frame(frame, fmt, title="model presets (spkprune.create_model)")
