"""Stage adapters: each stage type runs the agreed CLI command of its package, in this process.

The CLI is the contract between the packages (../shared/CLI.md), so a stage's options are turned into exactly the
argv a person would type (`argv_for`), and the command runs in-process through the Typer app with its own click
context (no interpreter start-up, no re-import of torch). Its user errors propagate as SpkpruneError. Commands
that can print JSON (`evaluate`, `flops report`, `imp`) are asked for it, and their stdout is parsed into the
stage's results; everything else they print goes to stderr, so `spkprune run --format json` stays one document.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

from spkprune.errors import SpkpruneError
from spkprune.recipes.resolve import Stage
from spkprune.recipes.schema import option_flag


def argv_for(stage: Stage, *, resume: bool = False, overwrite: bool = False) -> list[str]:
    """The command line (after `spkprune`) that runs `stage`."""
    stype = stage.type
    argv = list(stype.command)
    if stype.positional:
        argv.append(str(stage.options[stype.positional]))
    for key in stype.options:  # schema order: the same argv whatever the recipe's key order
        value = stage.options.get(key)
        if key == stype.positional or value is None or (resume and key in stype.resume_drops):
            continue
        argv.extend(_flag(option_flag(key), stype.options[key], value))
    if "format" in stype.managed:
        argv.extend(["--format", "json"])
    if "progress" in stype.managed and not sys.stderr.isatty():
        argv.append("--no-progress")
    if resume and "resume" in stype.managed:
        argv.append("--resume")
    if overwrite and "overwrite" in stype.managed:
        argv.append("--overwrite")
    return argv


def _flag(flag: str, opt, value: Any) -> list[str]:
    if opt.kind == "bool":
        return [flag] if value else []
    if opt.kind in ("int_list", "str_list"):
        if opt.repeat:
            return [part for item in value for part in (flag, str(item))]
        return [flag, ",".join(str(v) for v in value)]
    if isinstance(value, float):
        return [flag, repr(value)]
    return [flag, str(value)]


def invoke(argv: list[str], store_dir: Path) -> str:
    """Run one spkprune command in-process; returns what it printed on stdout (logs go to stderr)."""
    command, args, prog = _command(argv)
    captured = io.StringIO()
    from spkprune.cli.app import CliState

    exit_types, usage_types = _click_exceptions()
    with contextlib.redirect_stdout(captured):
        try:
            code = command.main(args=args, prog_name=prog, standalone_mode=False, obj=CliState(store_dir=Path(store_dir)))
        except exit_types as done:
            code = done.exit_code
        except usage_types as err:  # a usage error: the schema and the CLI disagree
            raise SpkpruneError(f"`{prog} {' '.join(args)}`: {err.format_message()}") from None
    if isinstance(code, int) and code != 0:
        raise SpkpruneError(f"`{prog} {' '.join(args)}` exited with code {code}")
    return captured.getvalue()


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Exit and usage-error classes of the click that Typer runs on (recent Typer vendors its own copy)."""
    exits: list[type] = []
    usage: list[type] = []
    for module_name in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            module = __import__(module_name, fromlist=["Exit", "ClickException"])
        except ImportError:
            continue
        for name, found in (("Exit", exits), ("ClickException", usage)):
            if isinstance(getattr(module, name, None), type):
                found.append(getattr(module, name))
    return tuple(exits), tuple(usage)


def _command(argv: list[str]):
    """The click command for `argv` (descending into groups such as `flops`), the rest of argv, and its name.

    The subcommand runs under its own context, below the `spkprune` group, so its SpkpruneError reaches the runner
    (which names the stage) instead of the group's one-line printer, and its store is the one given here."""
    import typer.main

    from spkprune.cli import app

    node = typer.main.get_command(app)
    path = ["spkprune"]
    rest = list(argv)
    while getattr(node, "commands", None) is not None and rest:
        sub = node.commands.get(rest[0])
        if sub is None:
            raise SpkpruneError(f"spkprune has no command {' '.join([*path[1:], rest[0]])!r}; this spkprune is incomplete")
        node, path = sub, [*path, rest.pop(0)]
    return node, rest, " ".join(path)


def parse_json_output(text: str, what: str) -> Any:
    """The one JSON document a `--format json` command printed."""
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")  # tolerate a stray line before the document
        try:
            return json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            raise SpkpruneError(f"{what} printed something other than one JSON document on stdout") from None
