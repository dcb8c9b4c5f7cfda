"""The Spikformer model family: `create_model(name, **overrides)` and `list_models()`, like timm."""

from __future__ import annotations

from spkprune.models.presets import (
    DEFAULT_DIGITS_PRESET,
    PRESETS,
    SpikformerConfig,
    get_config,
    list_models,
)
from spkprune.models.spikformer import Spikformer, check_state_dict


def create_model(name: str, **overrides) -> Spikformer:
    """Build preset `name` (see `list_models()`), with config fields replaced by `overrides` (e.g. `timesteps=2`)."""
    return Spikformer(get_config(name, **overrides), preset=name)


def model_from_config(config: SpikformerConfig | dict, preset: str | None = None) -> Spikformer:
    """Build a model from a full configuration (as stored in checkpoint metadata)."""
    if isinstance(config, dict):
        config = SpikformerConfig.from_dict(config)
    return Spikformer(config, preset=preset)


__all__ = [
    "DEFAULT_DIGITS_PRESET",
    "PRESETS",
    "Spikformer",
    "SpikformerConfig",
    "check_state_dict",
    "create_model",
    "get_config",
    "list_models",
    "model_from_config",
]
