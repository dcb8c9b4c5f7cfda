"""A stage's identity: a hash of its type, the options that decide its result, and the identities of its inputs.

Output names (`name`, `out`) and display or speed options are not part of it: renaming an artifact re-runs nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from spkprune.recipes.resolve import Stage

HASH_LENGTH = 16


def stage_hash(stage: "Stage", earlier: dict[str, "Stage"]) -> str:
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


def identity_options(stage: "Stage") -> dict:
    options: dict[str, Any] = {}
    for key, value in stage.options.items():
        opt = stage.type.options[key]
        if not opt.identity or value is None:
            continue
        target = stage.inputs.get(key)
        if target is not None and target.stage is not None:
            value = {"stage": target.stage, "tag": target.tag}  # the upstream hash is in "inputs"
        options[key] = value
    return options
