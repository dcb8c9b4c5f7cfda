"""Per-block widths of a compacted model (`spkprune compact`), shared by every family's configuration.

A compacted model records the widths it kept in optional configuration fields: `block_heads` (attention heads per
block, each head keeping its original width), `block_mlp_hidden` (MLP hidden channels per block) and, where the
family's stem has removable channels, `stem_channels` (outputs of the inner patch-splitting convolutions). None means
the preset's uniform widths, so presets and stored configurations without them are unchanged.
"""

from __future__ import annotations

from typing import Mapping

# field -> how many numbers it holds (None: one per block, the configuration's depth)
BLOCK_WIDTHS = {"block_heads": None, "block_mlp_hidden": None}
STEM_WIDTHS = {"stem_channels": 3}


def width_problems(config, fields: Mapping[str, int | None]) -> list[str]:
    """Normalise the width fields of a frozen dataclass `config` to tuples (JSON gives lists) and list what is wrong
    with them (a count that does not fit, a width below 1)."""
    problems = []
    for name, length in fields.items():
        value = getattr(config, name)
        if value is None:
            continue
        widths = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        object.__setattr__(config, name, widths)
        expected = config.depth if length is None else length
        if len(widths) != expected or not all(isinstance(w, int) and w >= 1 for w in widths):
            problems.append(f"{name} must be {expected} whole numbers >= 1, got {list(widths)}")
    return problems


def widths_as_lists(data: dict, fields: Mapping[str, int | None]) -> dict:
    """`data` (a configuration's `asdict`) with its width tuples as lists, JSON's form, so that a stored configuration
    compares equal to a fresh one."""
    for name in fields:
        if data.get(name) is not None:
            data[name] = list(data[name])
    return data


def width_of(widths: tuple[int, ...] | None, index: int, uniform: int) -> int:
    """Entry `index` of a width field, or the uniform width when the field is None."""
    return uniform if widths is None else widths[index]
