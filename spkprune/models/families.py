"""The model families spkprune knows, and the one interface its commands use (`SpikingModel`).

A family is a reimplementation of one original code base (module names, shapes and arithmetic) plus its named
presets. Every command reaches models through this registry: `family_of_preset(name)` for a preset name,
`family_of_config(data)` for a stored configuration, `family_of(model)` for a built model. Adding a family means
adding its model module, its presets module and one `Family(...)` entry in `FAMILIES` below.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from spkprune.errors import SpkpruneError
from spkprune.models.neurons import LIF
from spkprune.models.presets import PRESETS, SpikformerConfig, get_config as spikformer_config
from spkprune.models.qkformer import QKFormer, QKFormerConfig
from spkprune.models.qkformer_presets import QKFORMER_PRESETS
from spkprune.models.sdt import SDTConfig, SpikeDrivenTransformer
from spkprune.models.sdt_presets import SDT_PRESETS
from spkprune.models.spikformer import Spikformer


class ModelConfig(Protocol):
    """What commands may read of any family's configuration (a frozen dataclass)."""

    num_classes: int
    in_channels: int
    img_size: int
    timesteps: int
    depth: int
    embed_dim: int
    dataset: str | None

    @property
    def variant(self) -> str:
        """The input the structure was made for: "cifar", "dvs" (event frames) or "imagenet"."""

    def to_dict(self) -> dict: ...


@runtime_checkable
class SpikingModel(Protocol):
    """What imp, select-tokens, flops, export, the fast paths and the store may use of a model, whatever its family.

    - `config`, `preset` (name or None), `family` (the registry name), `name` (for messages);
    - `prunable_weights()`: conv and linear weights by state_dict key (never biases, norms or embeddings);
    - `neuron_sites()`: every LIF by module path; `site.record = True` keeps its last output spikes;
    - `num_tokens`, `token_dim`: the tokens a selector would see and their width;
    - `selector_locations()`: blocks before which a gathering token selector may sit; empty where the family has
      no token axis a selector can gather (the commands then refuse select-tokens in one line);
    - `model(x)`: logits `[B, classes]` from images `[B,C,H,W]` or event frames `[B,T,C,H,W]`, every neuron reset
      first; `load_state_dict(sd, strict=True)` raises one `SpkpruneError` when the keys or shapes do not fit.
    """

    config: ModelConfig
    preset: str | None
    family: str

    @property
    def name(self) -> str: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def token_dim(self) -> int: ...

    def prunable_weights(self) -> dict[str, nn.Parameter]: ...

    def neuron_sites(self) -> dict[str, LIF]: ...

    def selector_locations(self) -> list[int]: ...

    def used_parameter_count(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Family:
    """One family: its model and config classes, its presets and what the commands can do with it yet."""

    name: str  # registry name, also the preset prefix: "sdt" -> "sdt-2-64-digits"
    title: str
    original: str  # the original code base (GitHub owner/name)
    model_class: type[nn.Module]
    config_class: type
    presets: Mapping[str, Any]
    configure: Callable[..., Any] | None = None  # (preset, **overrides) -> config; None: the preset with overrides
    counted: bool = False  # `flops report` traces it (counting/structure.py)
    token_selection: bool = False  # its models have selector locations (`select-tokens`)
    channel_structures: bool = False  # `imp --granularity channel` knows its structures (pruning/structures.py)

    def list(self, pattern: str | None = None) -> list[str]:
        """Preset names, optionally filtered by a glob pattern."""
        names = sorted(self.presets)
        return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names

    @property
    def options(self) -> list[str]:
        """The configuration fields a preset's overrides may set."""
        return sorted(f.name for f in dataclasses.fields(self.config_class) if f.name != "extras")

    def get_config(self, preset: str, **overrides):
        """Preset `preset`'s configuration with fields replaced by `overrides`."""
        if preset not in self.presets:
            raise SpkpruneError(f"unknown {self.title} preset {preset!r}; known: {', '.join(self.list())}")
        unknown = sorted(set(overrides) - set(self.options))
        if unknown:
            raise SpkpruneError(
                f"unknown option(s) for preset {preset} ({self.name} family): {_with_owners(unknown)}; "
                f"known: {', '.join(self.options)}"
            )
        if self.configure is not None:
            return self.configure(preset, **overrides)
        return dataclasses.replace(self.presets[preset], **overrides)  # the config class checks the result

    def create(self, preset: str, **overrides) -> nn.Module:
        """Build preset `preset` with config fields replaced by `overrides`."""
        return self.model_class(self.get_config(preset, **overrides), preset=preset)

    def config_from_dict(self, data: Mapping[str, Any]):
        """The configuration a stored `config.to_dict()` describes."""
        return self.config_class.from_dict(dict(data))

    def from_config(self, config, preset: str | None = None) -> nn.Module:
        """A model from a full configuration (an instance of `config_class` or its `to_dict()`)."""
        if isinstance(config, Mapping):
            config = self.config_from_dict(config)
        return self.model_class(config, preset=preset)

    def fits_config(self, data: Mapping[str, Any]) -> bool:
        """True when `data` has every required field of this family's configuration and no field it lacks."""
        missing = dataclasses.MISSING
        fields = dataclasses.fields(self.config_class)
        required = {f.name for f in fields if f.default is missing and f.default_factory is missing}
        return required <= set(data) <= set(self.options)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("spikformer", "Spikformer", "ZK-Zhou/spikformer", Spikformer, SpikformerConfig, PRESETS,
               spikformer_config, counted=True, token_selection=True, channel_structures=True),
        Family("sdt", "Spike-driven Transformer (V1)", "BICLab/Spike-Driven-Transformer", SpikeDrivenTransformer,
               SDTConfig, SDT_PRESETS, counted=True, token_selection=True, channel_structures=True),
        Family("qkformer", "QKFormer", "zhouchenlin2096/QKFormer", QKFormer, QKFormerConfig, QKFORMER_PRESETS,
               counted=True, token_selection=True, channel_structures=True),
    )
}


for _family in FAMILIES.values():  # the registry names the family on its model class (`model.family`)
    _family.model_class.family = _family.name


def _with_owners(options: list[str]) -> str:
    """`num_pools (a spikformer option)`: where an option a family lacks belongs to other families."""
    named = []
    for option in options:
        owners = [f.name for f in FAMILIES.values() if option in f.options]
        named.append(f"{option} (a {'/'.join(owners)} option)" if owners else option)
    return ", ".join(named)


def list_families() -> list[str]:
    return list(FAMILIES)


def get_family(name: str) -> Family:
    """The family called `name`; one clear error naming the known ones otherwise."""
    if name not in FAMILIES:
        raise SpkpruneError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def all_presets() -> list[str]:
    return sorted(name for family in FAMILIES.values() for name in family.presets)


def family_of_preset(preset: str) -> Family:
    """The family preset `preset` belongs to; `unknown preset ...` (with close names) otherwise."""
    for family in FAMILIES.values():
        if preset in family.presets:
            return family
    names = all_presets()
    close = difflib.get_close_matches(preset, names, n=5, cutoff=0.6)
    close = close or [n for n in names if preset.split("-")[-1] in n] or names
    raise SpkpruneError(f"unknown preset {preset!r}; known presets: {', '.join(close)} (see spkprune list-models)")


def family_of_config(data: Mapping[str, Any]) -> Family | None:
    """The family whose configuration `data` (a stored `config.to_dict()`) is; None when it fits none."""
    fitting = [family for family in FAMILIES.values() if family.fits_config(data)]
    return fitting[0] if len(fitting) == 1 else None


def family_of(model: nn.Module) -> Family:
    """The family of a built model (by its class)."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_class):
            return family
    raise SpkpruneError(f"{type(model).__name__} is not a model of a known family ({', '.join(FAMILIES)})")


def family_of_meta(meta: Mapping[str, Any]) -> Family | None:
    """The family checkpoint metadata names: `family`, else its preset's, else its configuration's."""
    if meta.get("family") in FAMILIES:
        return FAMILIES[meta["family"]]
    arch = meta.get("arch")
    if arch and any(arch in f.presets for f in FAMILIES.values()):
        return family_of_preset(arch)
    config = meta.get("config")
    return family_of_config(config) if isinstance(config, Mapping) else None


def _key_pattern(key: str) -> str:
    """`block.3.attn.q_conv.weight` -> `block.#.attn.q_conv.weight` (block numbers, not digits inside names)."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "#", key)


@functools.lru_cache(maxsize=1)
def _preset_key_patterns() -> tuple[tuple[str, frozenset[str]], ...]:
    """(family name, key patterns) of every preset: weightless models on the meta device, built once."""
    patterns = []
    for family in FAMILIES.values():
        for preset in family.presets:
            with torch.device("meta"):
                keys = family.create(preset).state_dict()
            patterns.append((family.name, frozenset(_key_pattern(k) for k in keys)))
    return tuple(patterns)


def family_of_state_dict(keys: Iterable[str]) -> Family | None:
    """The family whose presets' state_dict keys these are most like (token selectors aside); None when no preset
    shares at least 90% of them."""
    patterns = {_key_pattern(k) for k in keys if not k.startswith("token_selectors.")}
    best, score = None, 0.0
    for name, known in _preset_key_patterns():
        overlap = len(patterns & known) / max(1, len(patterns | known))
        if overlap > score:
            best, score = name, overlap
    return FAMILIES[best] if best is not None and score >= 0.9 else None


def check_state_dict_family(model: nn.Module, keys: Iterable[str], where: str) -> None:
    """One line naming both families when the state_dict `keys` are another family's than `model`'s."""
    theirs, ours = family_of_state_dict(keys), family_of(model)
    if theirs is not None and theirs is not ours:
        raise SpkpruneError(
            f"{where} holds weights of the {theirs.name} family ({theirs.title}), which do not load into "
            f"{model.name} of the {ours.name} family; give a preset of the {theirs.name} family "
            f"(spkprune list-models --family {theirs.name})"
        )


def preset_rows(pattern: str | None = None, family: str | None = None) -> list[dict]:
    """One row per preset (family, preset, dataset, input, timesteps, params), by family then name; what
    `spkprune list-models` prints. Parameters are counted on weightless models (the meta device)."""
    rows = []
    for fam in [get_family(family)] if family else FAMILIES.values():
        for preset in fam.list(pattern):
            with torch.device("meta"):
                model = fam.create(preset)
            cfg = model.config
            rows.append({
                "family": fam.name, "preset": preset, "dataset": cfg.dataset,
                "input": f"{cfg.in_channels}x{cfg.img_size}x{cfg.img_size}", "timesteps": cfg.timesteps,
                "params": sum(p.numel() for p in model.parameters()),
            })
    return rows


def check_same_family(preset: str, config: Mapping[str, Any], where: str = "the configuration") -> Family:
    """The family of `preset`, after checking that `config` (a stored `to_dict()`) is a configuration of it."""
    family = family_of_preset(preset)
    if not family.fits_config(config):
        other = family_of_config(config)
        kind = f"of the {other.name} family" if other else "of no known family"
        raise SpkpruneError(f"preset {preset} is of the {family.name} family but {where} is {kind}")
    return family


__all__ = [
    "FAMILIES",
    "Family",
    "ModelConfig",
    "SpikingModel",
    "all_presets",
    "check_same_family",
    "check_state_dict_family",
    "family_of",
    "family_of_config",
    "family_of_meta",
    "family_of_preset",
    "family_of_state_dict",
    "get_family",
    "list_families",
    "preset_rows",
]


def require(family: Family | None, capability: str, command: str) -> None:
    """One line when `command` needs a `capability` (a Family flag) that `family` does not have yet."""
    if family is not None and not getattr(family, capability):
        able = [name for name, other in FAMILIES.items() if getattr(other, capability)]
        raise SpkpruneError(f"{command} does not work on the {family.name} family yet (it works on: {', '.join(able)})")
