"""The model families (Spikformer, Spike-driven Transformer, QKFormer): `create_model(name, **overrides)`,
`list_models()` and `get_config(name)` over every family's presets, like timm. See `families.py` for the registry and
the `SpikingModel` interface the commands use."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from spkprune.errors import SpkpruneError
from spkprune.models.families import (
    FAMILIES,
    Family,
    SpikingModel,
    all_presets,
    check_same_family,
    check_state_dict_family,
    family_of,
    family_of_config,
    family_of_meta,
    family_of_preset,
    family_of_state_dict,
    get_family,
    list_families,
)
from spkprune.models.presets import DEFAULT_DIGITS_PRESET, PRESETS, SpikformerConfig
from spkprune.models.spikformer import Spikformer, check_state_dict


def list_models(pattern: str | None = None, family: str | None = None) -> list[str]:
    """Preset names of every family (or of `family`), optionally filtered by a glob pattern (`*digits*`)."""
    families = [get_family(family)] if family else list(FAMILIES.values())
    return sorted(name for fam in families for name in fam.list(pattern))


def get_config(name: str, **overrides):
    """The configuration of preset `name` (its family's config class), with fields replaced by `overrides`."""
    return family_of_preset(name).get_config(name, **overrides)


def create_model(name: str, **overrides) -> nn.Module:
    """Build preset `name` (see `list_models()`), with config fields replaced by `overrides` (e.g. `timesteps=2`)."""
    return family_of_preset(name).create(name, **overrides)


def model_from_config(config: Any, preset: str | None = None) -> nn.Module:
    """Build a model from a full configuration (as stored in checkpoint metadata), of whichever family it is:
    an instance of a family's config class, or its `to_dict()` (the family of `preset` when that is a preset)."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family.from_config(config, preset=preset)
    if not isinstance(config, Mapping):
        raise SpkpruneError(f"not a model configuration: {type(config).__name__}")
    if preset in all_presets():  # one line naming both families when the configuration is another family's
        return check_same_family(preset, config).from_config(config, preset=preset)
    family = family_of_config(config)
    if family is None:
        raise SpkpruneError(
            f"the configuration (keys {', '.join(sorted(config))}) is none of the known families' "
            f"({', '.join(FAMILIES)})"
        )
    return family.from_config(config, preset=preset)


__all__ = [
    "DEFAULT_DIGITS_PRESET",
    "FAMILIES",
    "PRESETS",
    "Family",
    "Spikformer",
    "SpikformerConfig",
    "SpikingModel",
    "check_same_family",
    "check_state_dict",
    "check_state_dict_family",
    "create_model",
    "family_of",
    "family_of_config",
    "family_of_meta",
    "family_of_preset",
    "family_of_state_dict",
    "get_config",
    "get_family",
    "list_families",
    "list_models",
    "model_from_config",
]
