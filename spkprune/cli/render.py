"""Output helpers: tables for people (rich) and json/csv/md for machines, on stdout; logs on stderr."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterable

import pandas as pd
from rich.console import Console
from rich.table import Table

from spkprune.errors import SpkpruneError

FORMATS = ("table", "json", "csv", "md")

# Wide enough that refs and layer names are not cut when stdout is a pipe or a file.
stdout = Console(width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True)


def check_format(fmt: str, allowed: Iterable[str] = FORMATS) -> str:
    allowed = tuple(allowed)
    if fmt not in allowed:
        raise SpkpruneError(f"unknown --format {fmt!r}; choose one of {', '.join(allowed)}")
    return fmt


def _cell(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def render_frame(df: pd.DataFrame, fmt: str = "table", title: str | None = None, extra: dict | None = None) -> None:
    """Print a DataFrame as a rich table, or as one JSON / CSV / Markdown document on stdout.

    `extra` (totals, notes) goes into the JSON document and under the table.
    """
    check_format(fmt)
    if fmt == "json":
        doc: Any = json.loads(df.to_json(orient="records", double_precision=15))
        if extra is not None:
            doc = {"rows": doc, **extra}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif fmt == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif fmt == "md":
        sys.stdout.write(frame_to_markdown(df) + "\n")
        for key, value in (extra or {}).items():
            sys.stdout.write(f"\n**{key}**: {value}\n")
    else:
        table = Table(title=title, show_lines=False)
        for col in df.columns:
            numeric = pd.api.types.is_numeric_dtype(df[col])
            table.add_column(str(col), justify="right" if numeric else "left", overflow="fold")
        for row in df.itertuples(index=False):
            table.add_row(*(_cell(v) for v in row))
        stdout.print(table)
        for key, value in (extra or {}).items():
            stdout.print(f"{key}: {value}")


def frame_to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no dependency on tabulate)."""
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "| " + " | ".join("---" for _ in df.columns) + " |"
    rows = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows])
