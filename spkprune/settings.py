"""Settings declared once: each command's options as one typed pydantic model.

A settings model carries every option's type, bounds, choices, default and help. The library validates its input
with it, recipes validate each stage with it (errors name the key path: `stages.ticket.target: ...`), and the CLI
builds its options from it (`spkprune.cli.options`). Per-field metadata says how the field meets the command line
and recipes:

- `flag`: the CLI flag when it is not `--field-name` (e.g. `--format`); `argument=True`: a positional argument;
- `recipe`: the key a recipe uses (`from` for the input reference), or None when recipes do not set it;
- `ref=True`: a checkpoint reference, which recipes link to earlier stages;
- `identity=False`: not part of a recipe stage's identity hash (output names, display and speed options);
- `split=True`: a comma-separated list on the command line (`1,2,3`), a list or a string in recipes;
- `repeat=True`: a repeatable flag on the command line (`--exclude a --exclude b`).
"""

from __future__ import annotations

from typing import Annotated, Any, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spkprune.errors import SpkpruneError

S = TypeVar("S", bound="Settings")
_MISSING: Any = ...

# Bounded number types that settings across the packages share.
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    argument: bool = False,
    recipe: str | None | bool = True,
    ref: bool = False,
    identity: bool = True,
    split: bool = False,
    repeat: bool = False,
    **bounds: Any,
) -> Any:
    """A settings field with its help text and how it meets the command line and recipes."""
    extra = {"flag": flag, "argument": argument, "recipe": recipe, "ref": ref, "identity": identity,
             "split": split, "repeat": repeat}
    return Field(default, description=help, json_schema_extra=extra, **bounds)


def field_meta(model: type[BaseModel], name: str) -> dict:
    """The metadata `option()` attached to a field (defaults for plain fields)."""
    extra = model.model_fields[name].json_schema_extra
    meta = {"flag": None, "argument": False, "recipe": True, "ref": False, "identity": True, "split": False,
            "repeat": False}
    if isinstance(extra, dict):
        meta.update(extra)
    return meta


def cli_flag(model: type[BaseModel], name: str) -> str:
    return field_meta(model, name)["flag"] or "--" + name.replace("_", "-")


def recipe_key(model: type[BaseModel], name: str) -> str | None:
    """The key a recipe stage uses for this field, or None when recipes cannot set it."""
    key = field_meta(model, name)["recipe"]
    if key is False or key is None:
        return None
    return name if key is True else str(key)


def split_list(value: Any) -> Any:
    """`"1,2,3"` -> ["1", "2", "3"] (typed by the field afterwards); lists and other values pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.strip().strip("[]").split(",") if part.strip()]
    return value


class SettingsError(SpkpruneError):
    """Settings that do not validate: the message names the first bad field; `where`/`style` can re-describe it."""

    def __init__(self, model: type[BaseModel], validation: ValidationError, *, where: str = "", style: str = "key"):
        super().__init__(describe_error(model, validation, where=where, style=style))
        self.model, self.validation = model, validation


class Settings(BaseModel):
    """Base of every command's settings: unknown keys are refused, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise SettingsError(type(self), err) from None

    @classmethod
    def parse(cls: type[S], values: Mapping[str, Any], *, where: str = "", style: str = "key") -> S:
        """Validated settings, or SpkpruneError naming the first bad key (`style="flag"`: as the CLI flag)."""
        try:
            return cls.model_validate(dict(values))  # runs __init__, which raises SettingsError
        except SettingsError as err:
            raise SettingsError(err.model, err.validation, where=where, style=style) from None

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with `changes` applied."""
        return type(self).parse({**self.model_dump(), **changes})


def describe_error(model: type[BaseModel], err: ValidationError, *, where: str = "", style: str = "key") -> str:
    """One line for the first problem: `stages.imp.target: must be less than 1 (got 1.5)`."""
    first = err.errors(include_url=False)[0]
    loc = [str(part) for part in first.get("loc", ())]
    name = loc[0] if loc else ""
    if name in getattr(model, "model_fields", {}):
        label = cli_flag(model, name) if style == "flag" else (recipe_key(model, name) or name)
    else:
        label = name
    if where:
        label = f"{where}.{label}" if label else where
    message = _message(first)
    got = first.get("input")
    shown = "" if first.get("type") in ("missing", "extra_forbidden") or isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{label}: {message}{shown}" if label else f"{message}{shown}"


def _message(error: dict) -> str:
    kind = error.get("type", "")
    if kind == "missing":
        return "missing; this option is required"
    if kind == "extra_forbidden":
        return "unknown option"
    if kind in _PLAIN_TYPES:
        return _PLAIN_TYPES[kind]
    text = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if text.startswith(prefix):
            return text[len(prefix):]
    if text.startswith("Input should be "):
        text = "must be " + text[len("Input should be "):]
        for words, sign in _COMPARISONS:
            text = text.replace(words, sign)
        return text
    return text[:1].lower() + text[1:]


_PLAIN_TYPES = {
    "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "float_type": "must be a number", "bool_parsing": "must be true or false",
    "bool_type": "must be true or false", "string_type": "must be a string", "list_type": "must be a list",
    "tuple_type": "must be a list",
}
_COMPARISONS = (
    ("greater than or equal to", ">="), ("less than or equal to", "<="), ("greater than", ">"), ("less than", "<"),
)
