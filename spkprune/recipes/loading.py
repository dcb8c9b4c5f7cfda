"""From a YAML file and `key=value` overrides to the raw recipe tree that the resolver checks and links."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from spkprune.recipes.messages import RecipeError, did_you_mean, kind_of
from spkprune.recipes.recipe import Recipe
from spkprune.recipes.resolve import resolve_recipe
from spkprune.recipes.schema import SECTION_KEYS, TOP_LEVEL
from spkprune.recipes.sweep import SWEEP_KEY, expand_sweep, is_sweep_override

_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+-]{0,63}$")  # no dots: stage names are parts of key paths


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, interpolate, validate and hash a recipe file."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"no recipe file {path}; see recipes/ for examples") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise RecipeError(f"cannot read recipe {path}: {err}") from None
    return parse_recipe(text, where=where, default_name=path.stem, overrides=overrides, path=path)


def parse_recipe(
    text: str,
    *,
    where: str = "recipe",
    default_name: str = "recipe",
    overrides: list[str] | None = None,
    path: Path | None = None,
) -> Recipe:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecipeError(f"{where}: {problem}{at}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys (model, data, seed, vars, stages), got {kind_of(raw)}")
    raw = _normalise_stages(raw, where)
    grid = raw.pop(SWEEP_KEY, None)
    overrides = list(overrides or [])
    for item in overrides:
        if not is_sweep_override(item):
            apply_override(raw, item, where)
    if grid is not None or any(map(is_sweep_override, overrides)):  # a grid of points: see sweep.py
        return expand_sweep(raw, grid, where=where, default_name=default_name, path=path, overrides=overrides,
                            locate=key_path)
    return resolve_recipe(raw, where, default_name, path, overrides)


def _normalise_stages(raw: dict, where: str) -> dict:
    """`stages` as an ordered mapping name -> options (a list of {name: ..., type: ...} is accepted too)."""
    raw = copy.deepcopy(raw)
    stages = raw.get("stages")
    if stages is None:
        raise RecipeError(f"{where}: stages: missing; expected a mapping of named stages (train, imp, ...)")
    if isinstance(stages, list):
        mapping: dict[str, Any] = {}
        for index, item in enumerate(stages):
            if not isinstance(item, dict) or "name" not in item:
                raise RecipeError(f"{where}: stages[{index}]: expected a mapping with `name` and `type`")
            item = dict(item)
            name = str(item.pop("name"))
            if name in mapping:
                raise RecipeError(f"{where}: stages[{index}].name: duplicate stage name {name!r}")
            mapping[name] = item
        stages = mapping
    if not isinstance(stages, dict) or not stages:
        raise RecipeError(f"{where}: stages: expected a non-empty mapping of named stages, got {kind_of(stages)}")
    for name, body in stages.items():
        if not isinstance(name, str) or not _STAGE_RE.match(name):
            raise RecipeError(
                f"{where}: stages.{name}: invalid stage name; use letters, digits and _ + - (starting with a "
                "letter or digit; no dots, they separate key paths)"
            )
        if not isinstance(body, dict):
            raise RecipeError(f"{where}: stages.{name}: expected a mapping of options with a `type`, got {kind_of(body)}")
        stages[name] = {str(key).replace("-", "_"): value for key, value in body.items()}
    raw["stages"] = stages
    return raw


# ---------------------------------------------------------------------------------------------- overrides
def apply_override(raw: dict, item: str, where: str) -> None:
    """Apply one `key.path=value` override to the raw tree (values stay strings; the schema types them)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override {item!r}: expected key=value, for example imp.rounds=5 or seed=1")
    parts = key_path(raw, key, f"override {item!r}")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            if parts[0] == "stages" and depth == 1:
                raise RecipeError(f"override {item!r}: no stage {part!r}; stages: {', '.join(raw['stages'])}")
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
        node = child
    node[parts[-1]] = _override_value(parts, value)


def key_path(raw: dict, key: str, label: str) -> list[str]:
    """The full path in the raw tree of an override or sweep key (`imp.rounds` -> stages.ticket.rounds); errors
    start with `label`."""
    parts = [part.replace("-", "_") for part in key.split(".")]
    if any(not part for part in parts):
        raise RecipeError(f"{label}: empty part in the key path")
    head = parts[0]
    stages = raw["stages"]
    if head in TOP_LEVEL or head in SECTION_KEYS:
        if head in TOP_LEVEL and len(parts) > 1:
            raise RecipeError(f"{label}: {head} is a single value, not a mapping")
        return parts
    if head in stages:
        return ["stages", *parts]
    of_type = [name for name, body in stages.items() if body.get("type") == head]
    if len(of_type) == 1:
        return ["stages", of_type[0], *parts[1:]]
    if len(of_type) > 1:
        raise RecipeError(
            f"{label}: several stages have type {head!r} ({', '.join(of_type)}); name the stage instead"
        )
    known = [*TOP_LEVEL, *SECTION_KEYS, *stages]
    raise RecipeError(
        f"{label}: {head!r} is not a recipe key, a stage name or a stage type{did_you_mean(head, known)}; "
        f"keys: {', '.join(TOP_LEVEL)}, data, vars; stages: {', '.join(stages)}"
    )


def _override_value(parts: list[str], value: str) -> Any:
    if value.strip() in ("null", "~", ""):
        return None
    if parts[0] == "vars":  # variables have no schema: read the value as YAML (5 -> int, [1, 2] -> list)
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value
