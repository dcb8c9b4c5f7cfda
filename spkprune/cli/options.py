"""Typer commands built from settings models: every option's name, type, default, choices and help come from the
command's one settings declaration (spkprune.settings), so the CLI and the library cannot drift apart."""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, List, Literal, Optional, Union

import typer

from spkprune.cli.render import FORMATS
from spkprune.settings import Settings, cli_flag, field_meta

# Presentation options: how a command shows its result, never what it computes (so not part of any settings).
PRESENTATION: dict[str, inspect.Parameter] = {
    "fmt": inspect.Parameter(
        "fmt", inspect.Parameter.KEYWORD_ONLY, default="table",
        annotation=Annotated[Literal[FORMATS], typer.Option("--format", help="Output: table (for people), json, csv "
                                                                              "or md (for scripts).")],
    ),
    "progress": inspect.Parameter(
        "progress", inspect.Parameter.KEYWORD_ONLY, default=True,
        annotation=Annotated[bool, typer.Option("--progress/--no-progress", help="Live progress bars on stderr.")],
    ),
}


def settings_command(
    app: typer.Typer, name: str, settings: type[Settings], *, presentation: tuple[str, ...] = ("fmt",),
    metavars: dict[str, str] | None = None,
) -> Callable[[Callable], Callable]:
    """Register `handler(ctx, settings_instance, **presentation)` as command `name` with options built from
    `settings`. The handler's docstring is the command's help."""

    def register(handler: Callable) -> Callable:
        fields = list(settings.model_fields)

        def command(ctx: typer.Context, **values: Any) -> Any:
            shown = {key: values.pop(key) for key in presentation}
            given = {key: _from_cli(settings, key, value) for key, value in values.items()}
            return handler(ctx, settings.parse(given, style="flag"), **shown)

        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
        params += [_parameter(settings, key, (metavars or {}).get(key)) for key in fields]
        params += [PRESENTATION[key] for key in presentation]
        command.__signature__ = inspect.Signature(params)
        command.__doc__ = handler.__doc__
        command.__name__ = handler.__name__
        app.command(name)(command)
        return handler

    return register


def _parameter(settings: type[Settings], key: str, metavar: str | None) -> inspect.Parameter:
    field = settings.model_fields[key]
    meta = field_meta(settings, key)
    help_text = field.description or ""
    required = field.is_required()
    default = ... if required else _cli_default(field.default, meta)
    if meta["argument"]:
        info = typer.Argument(help=help_text, metavar=metavar or key.upper(), show_default=not required)
    else:
        info = typer.Option(*_flags(settings, key, field.annotation), help=help_text, metavar=metavar)
    annotation = Annotated[cli_type(field.annotation, meta), info]
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _flags(settings: type[Settings], key: str, annotation: Any) -> tuple[str, ...]:
    return (cli_flag(settings, key),)


def _cli_default(default: Any, meta: dict) -> Any:
    if meta["split"] and isinstance(default, (tuple, list)):
        return ",".join(map(str, default)) if default else None
    if meta["repeat"] and isinstance(default, (tuple, list)):
        return list(default)
    if isinstance(default, Path):
        return str(default)
    return default


def _from_cli(settings: type[Settings], key: str, value: Any) -> Any:
    """Typer's value as the settings expect it (repeatable options arrive as lists)."""
    if isinstance(value, list) and not field_meta(settings, key)["repeat"]:
        return tuple(value)
    return value


def cli_type(annotation: Any, meta: dict) -> Any:
    """The type Typer parses a settings field's value as: the field's own type without its bounds; lists as a
    comma-separated string (`split`) or a repeatable option (`repeat`); a ratio-or-list as a string."""
    annotation = _strip(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(origin):
        options = [arg for arg in args if arg is not type(None)]
        inner = cli_type(options[0], meta) if len(options) == 1 else str
        return Optional[inner] if type(None) in args else inner
    if origin is Literal:
        return annotation
    if origin in (tuple, list):
        if meta["repeat"]:
            return List[_strip(args[0])]
        return str
    return annotation


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_union(origin: Any) -> bool:
    return origin is Union or origin is types.UnionType
