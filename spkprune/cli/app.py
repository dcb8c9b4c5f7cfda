"""The Typer application: global options and the error contract (one line on stderr, exit 2)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from spkprune.errors import SpkpruneError

DEFAULT_STORE = "spkprune-store"


class _Group(TyperGroup):
    """Turns user errors raised anywhere below a command into one clear line and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SpkpruneError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is saved in the store; re-run the same command to resume", err=True)
            ctx.exit(130)


app = typer.Typer(
    cls=_Group,
    name="spkprune",
    help="Prune pretrained spiking transformers (Spikformer family): train, find lottery tickets, "
    "select tokens, count operations and export sparse tickets. Every command reads and writes one store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@dataclass
class CliState:
    store_dir: Path


@app.callback()
def _root(
    ctx: typer.Context,
    store: Path = typer.Option(
        None,
        "--store",
        help="Store directory (default: $SPKPRUNE_STORE or ./spkprune-store).",
        show_default=False,
    ),
) -> None:
    store_dir = store or Path(os.environ.get("SPKPRUNE_STORE") or DEFAULT_STORE)
    ctx.obj = CliState(store_dir=store_dir)


def store_dir(ctx: typer.Context) -> Path:
    """The store directory chosen by --store / $SPKPRUNE_STORE for this invocation."""
    root = ctx.find_root()
    state = root.obj if isinstance(root.obj, CliState) else None
    return state.store_dir if state else Path(os.environ.get("SPKPRUNE_STORE") or DEFAULT_STORE)


def main() -> None:
    app(prog_name="spkprune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
