"""Sweeps: a recipe's `sweep:` grid expanded into one recipe whose points share their common stages.

`sweep: {ticket.target: [0.5, 0.9], selected.keep: [0.5, 1.0]}` names stage options (or `vars.NAME`, `seed`,
`model`) by the keys overrides use, each with a list of values. Every point of the grid (the cartesian product) is
the recipe with those values set, resolved like any recipe. Stages whose identity hash is the same at every point
are one stage (one dense model); a stage whose hash varies is one stage per distinct hash, its name and outputs
suffixed with the values that change it (`ticket-target0.9`, `selected-target0.9-keep0.5`). The result is an
ordinary `Recipe` (a `SweepRecipe`, which also knows its points), so the runner skips, resumes and re-runs its
stages as usual.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from spkprune.recipes.messages import RecipeError, did_you_mean, kind_of, text_of
from spkprune.recipes.recipe import Recipe, Stage, StageInput
from spkprune.recipes.resolve import resolve_recipe
from spkprune.recipes.schema import STAGE_TYPES

SWEEP_KEY = "sweep"
MAX_POINTS = 256
SWEPT_TOP_LEVEL = ("seed", "model")
OUTPUT_PATHS = ("out", "plot")  # output locations a varying stage gets suffixed, so points do not overwrite
_NAME_MAX = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")
_LIST_KEY = re.compile(r"^(\w+)\[(\d+)\]$")

Locate = Callable[[dict, str, str], list]  # loading.key_path: (raw, key, label) -> the key's path in the raw tree


@dataclass(frozen=True)
class Axis:
    """One swept key: its path in the raw tree, its values, and the label its values carry in stage names."""

    key: str  # as written in the recipe: ticket.target
    path: tuple[str, ...]  # stages.ticket.target
    values: tuple[Any, ...]
    label: str  # target


@dataclass
class SweepPoint:
    values: dict[str, Any]  # axis key -> value
    stages: dict[str, str]  # the recipe's stage name -> the expanded stage that plays it at this point


@dataclass
class SweepRecipe(Recipe):
    axes: list[Axis] = field(default_factory=list)
    points: list[SweepPoint] = field(default_factory=list)


def is_sweep_override(item: str) -> bool:
    """`sweep.selected.keep=[0.5, 1.0]` sets an axis of the grid instead of a value of the recipe."""
    return item.partition("=")[0].strip().startswith(f"{SWEEP_KEY}.")


# ------------------------------------------------------------------------------------------------- the grid
def expand_sweep(
    raw: dict, grid: Any, *, where: str, default_name: str, path: Path | None, overrides: list[str], locate: Locate,
) -> SweepRecipe:
    """The recipe `raw` (plain overrides applied) at every point of `grid`, its shared stages merged."""
    grid = _grid_with_overrides(grid, overrides, where)
    axes = _label(_axes(raw, grid, where, locate))
    _check_size(axes, where)
    _check_overrides(raw, axes, overrides, where, locate)
    points = []
    for indices in itertools.product(*(range(len(axis.values)) for axis in axes)):
        values = {axis.key: axis.values[i] for axis, i in zip(axes, indices)}
        points.append(_Point(indices, values, _resolve_point(raw, axes, values, where, default_name, path, overrides)))
    return _merge(axes, points, where)


@dataclass
class _Point:
    indices: tuple[int, ...]  # the value of each axis, by position
    values: dict[str, Any]
    recipe: Recipe


def _grid_with_overrides(grid: Any, overrides: list[str], where: str) -> dict:
    if grid is None:
        grid = {}
    if not isinstance(grid, dict):
        raise RecipeError(f"{where}: {SWEEP_KEY}: expected a mapping of KEY: [values], got {kind_of(grid)}")
    grid = {str(key).replace("-", "_"): value for key, value in grid.items()}
    for item in filter(is_sweep_override, overrides):
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise RecipeError(f"override {item!r}: expected a YAML list of values, such as [0.5, 0.9]") from None
        grid[key.strip()[len(SWEEP_KEY) + 1:].replace("-", "_")] = value if isinstance(value, list) else [value]
    if not grid:
        raise RecipeError(f"{where}: {SWEEP_KEY}: empty; give at least one KEY: [values], "
                          "e.g. ticket.target: [0.5, 0.9]")
    return grid


def _axes(raw: dict, grid: dict, where: str, locate: Locate) -> list[Axis]:
    axes = []
    paths: dict[tuple, str] = {}
    for key, values in grid.items():
        label = f"{where}: {SWEEP_KEY}.{key}"
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{label}: expected a non-empty list of values, got {kind_of(values)}")
        if len({yaml.safe_dump(v) for v in values}) != len(values):
            raise RecipeError(f"{label}: a value is listed twice; list each value once")
        found = tuple(locate(raw, key, label))
        _check_path(raw, found, label)
        if found in paths:
            raise RecipeError(f"{label}: the same option as {SWEEP_KEY}.{paths[found]}; sweep it once")
        paths[found] = key
        axes.append(Axis(key, found, tuple(values), found[-1]))
    return axes


def _check_path(raw: dict, path: tuple, label: str) -> None:
    """What a sweep may vary: an identity option of a stage, a declared variable, the seed or the model."""
    head = path[0]
    if head == "stages":
        _check_stage_option(path, raw["stages"], label)
    elif head == "vars":
        declared = raw.get("vars") or {}
        if len(path) != 2 or path[1] not in declared:
            raise RecipeError(f"{label}: no variable {'.'.join(path[1:])!r}{did_you_mean(path[-1], declared)}; "
                              "declare it under vars: with a default value")
    elif head not in SWEPT_TOP_LEVEL:
        raise RecipeError(f"{label}: cannot be swept; sweep stage options, vars.NAME, seed or model")


def _check_stage_option(path: tuple, stages: dict, label: str) -> None:
    if len(path) != 3:
        raise RecipeError(f"{label}: expected STAGE.OPTION (a stage option, e.g. ticket.target)")
    if path[1] not in stages:
        raise RecipeError(f"{label}: no stage {path[1]!r}{did_you_mean(path[1], stages)}; stages: {', '.join(stages)}")
    if path[2] == "type":
        raise RecipeError(f"{label}: a stage's type cannot be swept; sweep its options")
    stype = STAGE_TYPES.get(stages[path[1]].get("type"))
    if stype is None:
        return  # resolving the recipe names the unknown type
    option = stype.options.get(path[2])
    if option is None:
        raise RecipeError(
            f"{label}: unknown option for stage type {stype.name}{did_you_mean(path[2], stype.options)}; "
            f"expected one of {', '.join(k for k, o in stype.options.items() if o.identity)}"
        )
    if not option.identity:
        raise RecipeError(f"{label}: {path[2]} is an output name or display option, not part of what the stage "
                          "computes; sweeping it would change no result")


def _label(axes: list[Axis]) -> list[Axis]:
    """Labels for stage names: the option or variable name, or STAGE_OPTION where two axes share one."""
    counts: dict[str, int] = {}
    for axis in axes:
        counts[axis.label] = counts.get(axis.label, 0) + 1
    return [axis if counts[axis.label] == 1 else dataclasses.replace(axis, label="_".join(axis.path[1:]))
            for axis in axes]


def _check_size(axes: list[Axis], where: str) -> None:
    size = 1
    for axis in axes:
        size *= len(axis.values)
    if size > MAX_POINTS:
        shape = " x ".join(str(len(axis.values)) for axis in axes)
        raise RecipeError(f"{where}: {SWEEP_KEY}: {size} points ({shape}); at most {MAX_POINTS}: use fewer values "
                          "or split the grid into several recipes")


def _check_overrides(raw: dict, axes: list[Axis], overrides: list[str], where: str, locate: Locate) -> None:
    swept = {axis.path: axis.key for axis in axes}
    for item in overrides:
        if is_sweep_override(item):
            continue
        key = item.partition("=")[0].strip()
        found = tuple(locate(raw, key, f"override {item!r}"))
        if found in swept:
            raise RecipeError(f"override {item!r}: {key} is swept; override the grid instead: "
                              f"{SWEEP_KEY}.{swept[found]}=[{item.partition('=')[2]}]")


def _resolve_point(raw: dict, axes: list[Axis], point: dict, where: str, default_name: str, path: Path | None,
                   overrides: list[str]) -> Recipe:
    tree = copy.deepcopy(raw)
    for axis in axes:
        node = tree
        for part in axis.path[:-1]:
            node = node.setdefault(part, {})
        node[axis.path[-1]] = point[axis.key]
    try:
        return resolve_recipe(tree, where, default_name, path, overrides)
    except RecipeError as err:
        raise _point_error(str(err), axes, point, where) from None


def _point_error(message: str, axes: list[Axis], point: dict, where: str) -> RecipeError:
    """A bad value named by its sweep key; a problem it causes elsewhere named with the point it arose at."""
    for axis in axes:
        prefix = f"{where}: {'.'.join(axis.path)}: "
        if message.startswith(prefix):
            return RecipeError(f"{where}: {SWEEP_KEY}.{axis.key}: {message[len(prefix):]}")
    at = ", ".join(f"{key}={text_of(value)}" for key, value in point.items())
    return RecipeError(f"{message} (at sweep point {at})")


# ------------------------------------------------------------------------------------------------ merging
def _merge(axes: list[Axis], points: list[_Point], where: str) -> SweepRecipe:
    """One stage per distinct (recipe stage, identity hash), in recipe order, linked to its own upstream."""
    first = points[0].recipe
    names = [stage.name for stage in first.stages]
    changing = {name: _changing_axes(name, axes, points) for name in names}
    expanded: dict[tuple[str, str], Stage] = {}  # (recipe stage, hash) -> expanded stage
    sweep_points = []
    for point in points:
        for name in names:
            stage = point.recipe.stage(name)
            if (name, stage.hash) not in expanded:
                suffix = "".join(f"-{axis.label}{_text(point.values[axis.key])}" for axis in changing[name])
                expanded[(name, stage.hash)] = _renamed(stage, suffix, point.recipe, expanded)
        played = {name: expanded[(name, point.recipe.stage(name).hash)].name for name in names}
        sweep_points.append(SweepPoint(point.values, played))
    stages = [stage for (name, _), stage in sorted(expanded.items(), key=lambda item: names.index(item[0][0]))]
    _check_unique(stages, where)
    variables = {**first.vars, **{axis.path[1]: list(axis.values) for axis in axes if axis.path[0] == "vars"}}
    resolved = {**{k: v for k, v in first.resolved.items() if k != "stages"}, "vars": variables,
                SWEEP_KEY: {axis.key: list(axis.values) for axis in axes},
                "stages": {stage.name: {"type": stage.type.name, **stage.options} for stage in stages}}
    fields = {f.name: getattr(first, f.name) for f in dataclasses.fields(Recipe)}
    fields.update(stages=stages, resolved=resolved, vars=variables)
    return SweepRecipe(**fields, axes=axes, points=sweep_points)


def _changing_axes(name: str, axes: list[Axis], points: list[_Point]) -> list[Axis]:
    """The axes that change stage `name`: two points that differ only in such an axis give it different hashes."""
    hashes = {point.indices: point.recipe.stage(name).hash for point in points}
    found = []
    for position, axis in enumerate(axes):
        for indices, digest in hashes.items():
            others = (indices[:position] + (i,) + indices[position + 1:] for i in range(len(axis.values)))
            if any(hashes[other] != digest for other in others):
                found.append(axis)
                break
    return found


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "_".join(_text(item) for item in value)
    return _UNSAFE.sub("_", text_of(value)) or "none"


def _renamed(stage: Stage, suffix: str, recipe: Recipe, expanded: dict[tuple[str, str], Stage]) -> Stage:
    """A copy of a point's stage under its expanded name, reading its upstream stages' expanded outputs."""
    upstream = {dep: expanded[(dep, recipe.stage(dep).hash)] for dep in stage.deps}
    new = dataclasses.replace(stage, name=stage.name + suffix, options=copy.deepcopy(stage.options), inputs={},
                              deps=[upstream[dep].name for dep in stage.deps])
    if suffix:
        _suffix_outputs(new, suffix)
    for key, target in stage.inputs.items():
        if target.stage is None:
            new.inputs[key] = target
            continue
        source = upstream[target.stage]
        new.inputs[key] = StageInput(stage=source.name, tag=target.tag)
        _set_option(new.options, key, f"{source.artifact}@{target.tag}" if target.tag else source.output_ref)
    new.output_ref = _output_ref(new, stage)
    new.settings = new.type.build(new.options)
    return new


def _suffix_outputs(stage: Stage, suffix: str) -> None:
    if stage.artifact:
        stage.artifact = _fit(stage.artifact + suffix, stage)
        stage.options["name"] = stage.artifact
    for key in OUTPUT_PATHS:
        value = stage.options.get(key)
        if isinstance(value, str) and key in stage.type.options and not stage.type.options[key].identity:
            where = Path(value)
            stage.options[key] = str(where.with_name(where.stem + suffix + where.suffix) if where.suffix else
                                     where.with_name(where.name + suffix))


def _fit(name: str, stage: Stage) -> str:
    """An artifact name within the store's 64 characters (the stage's hash stands in for a long suffix)."""
    return name if len(name) <= _NAME_MAX else f"{stage.artifact[:_NAME_MAX - 17]}-{stage.hash}"


def _set_option(options: dict, key: str, value: str) -> None:
    listed = _LIST_KEY.match(key)  # `refs[1]`: one reference of a list option (bench)
    if listed:
        options[listed.group(1)][int(listed.group(2))] = value
    else:
        options[key] = value


def _output_ref(new: Stage, old: Stage) -> str | None:
    output = new.type.output
    if output in ("checkpoint", "rounds"):
        return f"{new.artifact}@{old.output_ref.partition('@')[2]}"
    if output == "folder":
        return new.options.get("out")
    return new.options.get(new.type.positional) if new.type.positional else None


def _check_unique(stages: list[Stage], where: str) -> None:
    seen: dict[tuple[str, str], str] = {}
    for stage in stages:
        for kind, value in (("stage", stage.name), ("artifact", stage.artifact), ("out", stage.options.get("out"))):
            if value is None:
                continue
            if (kind, value) in seen:
                raise RecipeError(f"{where}: {SWEEP_KEY}: stages {seen[(kind, value)]} and {stage.name} would both "
                                  f"write {kind} {value!r}; give them names that do not end like a sweep suffix")
            seen[(kind, value)] = stage.name


