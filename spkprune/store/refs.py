"""Store references: `NAME` or `NAME@TAG` (a bare name means `NAME@main`)."""

from __future__ import annotations

import re

from spkprune.errors import SpkpruneError

DEFAULT_TAG = "main"

# Names and tags start with a letter or digit so they can never be mistaken for paths (`./x`, `~/x`, `/x`) or options.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_TAG_RE = _NAME_RE


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".safetensors"):
        raise SpkpruneError(
            f"invalid name {name!r}: use letters, digits and . _ + - (at most 128 characters, "
            "starting with a letter or digit)"
        )
    return name


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise SpkpruneError(
            f"invalid tag {tag!r}: use letters, digits and . _ + - (at most 128 characters, "
            "starting with a letter or digit)"
        )
    return tag


def parse_ref(ref: str) -> tuple[str, str]:
    """Split `NAME[@TAG]` into (name, tag); SpkpruneError if it is not a valid store reference."""
    if not isinstance(ref, str) or not ref:
        raise SpkpruneError("empty reference: give NAME or NAME@TAG")
    name, sep, tag = ref.partition("@")
    if sep and not tag:
        raise SpkpruneError(f"reference {ref!r} has an empty tag: write NAME or NAME@TAG")
    return check_name(name), check_tag(tag) if sep else DEFAULT_TAG


def is_store_ref(ref: str) -> bool:
    """True when `ref` is syntactically a store reference (it may still not exist)."""
    try:
        parse_ref(ref)
    except SpkpruneError:
        return False
    return True


def format_ref(name: str, tag: str) -> str:
    return f"{name}@{tag}"
