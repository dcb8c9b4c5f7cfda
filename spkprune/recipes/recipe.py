"""A resolved recipe: its stages with typed options and links, and each stage's identity hash.

A stage's identity is a hash of its type, the options that decide its result, and the identities of its inputs.
Output names (`name`, `out`) and display or speed options are not part of it: renaming an artifact re-runs nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spkprune.recipes.schema import StageType
from spkprune.settings import Settings

HASH_LENGTH = 16


@dataclass(frozen=True)
class StageInput:
    """A reference option's target: an earlier stage's output (with an optional tag) or an external reference."""

    stage: str | None = None
    tag: str | None = None
    external: str | None = None


@dataclass
class Stage:
    name: str
    type: StageType
    options: dict[str, Any]  # typed, defaults and inherited values filled in; ref options as concrete refs
    settings: Settings | None = None  # the options validated by the stage type's settings (defaults included)
    inputs: dict[str, StageInput] = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)  # earlier stages this one depends on, in recipe order
    hash: str = ""
    output_ref: str | None = None  # what `from: <this stage>` resolves to
    artifact: str | None = None  # the store name it writes (checkpoint / rounds stages)


@dataclass
class Recipe:
    path: Path | None
    name: str
    model: str | None
    dataset: str | None
    data_dir: str | None
    seed: int
    store: str | None
    description: str | None
    vars: dict[str, Any]
    stages: list[Stage]
    resolved: dict  # the recipe after overrides and interpolation: stored with every artifact it makes
    overrides: list[str] = field(default_factory=list)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def downstream(self, name: str) -> list[str]:
        """Stages that depend on `name`, directly or not."""
        found: list[str] = []
        for stage in self.stages:
            if any(dep == name or dep in found for dep in stage.deps):
                found.append(stage.name)
        return found


# ------------------------------------------------------------------------------------------------ identity
def stage_hash(stage: Stage, earlier: dict[str, Stage]) -> str:
    """A stage's identity: its type, its identity options, and the identities of the stages it reads.

    Output names (`name`, `out`) are not part of it: renaming an artifact re-runs nothing upstream or downstream.
    """
    document = {
        "type": stage.type.name,
        "options": identity_options(stage),
        "inputs": {dep: earlier[dep].hash for dep in stage.deps},
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def identity_options(stage: Stage) -> dict:
    options: dict[str, Any] = {}
    for key, value in stage.options.items():
        opt = stage.type.options[key]
        if not opt.identity or value is None:
            continue
        if isinstance(value, list) and opt.is_ref:
            value = [_identity_of(stage, f"{key}[{i}]", item) for i, item in enumerate(value)]
        else:
            value = _identity_of(stage, key, value)
        options[key] = value
    return options


def _identity_of(stage: Stage, key: str, value: Any) -> Any:
    """A reference to an earlier stage is that stage (and tag): its hash is in "inputs"; anything else is itself."""
    target = stage.inputs.get(key)
    if target is not None and target.stage is not None:
        return {"stage": target.stage, "tag": target.tag}
    return value
