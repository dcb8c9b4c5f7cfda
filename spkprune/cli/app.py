"""The Typer application: global options and the error contract (one line on stderr, exit 2)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from spkprune.errors import SpkpruneError
from spkprune.store import Store

try:  # Typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older Typer runs on click itself
    from click.exceptions import NoArgsIsHelpError, UsageError

DEFAULT_STORE = "spkprune-store"
STORE_ENV = "SPKPRUNE_STORE"


class _Group(TyperGroup):
    """Turns user errors raised anywhere below a command, and usage errors, into one line and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as err:
            _usage_error(err)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SpkpruneError as err:
            typer.echo(f"error: {one_line(str(err))}", err=True)
            raise typer.Exit(2) from None
        except UsageError as err:
            _usage_error(err)
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is saved in the store; re-run the same command to resume", err=True)
            raise typer.Exit(130) from None


def _usage_error(err: UsageError):
    """`error: imp: missing argument 'REF' (see spkprune imp --help)` instead of click's usage box."""
    if isinstance(err, NoArgsIsHelpError):
        raise err
    path = err.ctx.command_path if err.ctx is not None else "spkprune"
    command = " ".join(path.split()[1:])
    message = one_line(err.format_message()).rstrip(".").replace("Value error, ", "")
    message = message[:1].lower() + message[1:]
    prefix = f"{command}: " if command else ""
    typer.echo(f"error: {prefix}{message} (see {path} --help)", err=True)
    raise typer.Exit(2) from None


def one_line(text: str) -> str:
    """A message as one line: line breaks inside it (from a user's input, say) are shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


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
    store_dir: Optional[Path]  # None: neither --store nor $SPKPRUNE_STORE was given


@app.callback()
def _root(
    ctx: typer.Context,
    store: Optional[Path] = typer.Option(
        None, "--store", envvar=STORE_ENV, help=f"Store directory (default: ./{DEFAULT_STORE}).", show_default=False,
    ),
) -> None:
    ctx.obj = CliState(store_dir=store)


def chosen_store_dir(ctx: typer.Context) -> Optional[Path]:
    """The store directory given by --store or $SPKPRUNE_STORE (None when neither was)."""
    state = ctx.find_root().obj
    return state.store_dir if isinstance(state, CliState) else None


def store_dir(ctx: typer.Context) -> Path:
    """The store directory of this invocation: --store, $SPKPRUNE_STORE, or ./spkprune-store."""
    return chosen_store_dir(ctx) or Path(DEFAULT_STORE)


def writable_store(ctx: typer.Context) -> Store:
    """The store commands that write open (created when missing)."""
    return Store.open(store_dir(ctx), create=True)


def readable_store(ctx: typer.Context) -> Store | None:
    """The store commands that only read open (None when there is none yet: files and presets need none)."""
    return Store.existing(store_dir(ctx))


def main() -> None:
    app(prog_name="spkprune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
