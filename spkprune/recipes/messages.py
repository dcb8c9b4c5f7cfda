"""How recipe problems are worded: one exception type, and small helpers that describe values and near misses."""

from __future__ import annotations

import difflib
from typing import Any

from spkprune.errors import SpkpruneError


class RecipeError(SpkpruneError):
    """A recipe that cannot run: the message starts with the file and the key path."""


def text_of(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    ) + ("" if isinstance(value, (dict, list)) or value is None else f" ({value!r})")


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
