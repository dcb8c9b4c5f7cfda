"""The structures of a model that can be removed whole, and which of them a mask set removes.

Where they sit is model knowledge (`spkprune.models.structure_sites`, one function per family: heads, MLP hidden
channels, stem channels). A structure (`Group`) owns slices of several coupled weights: the output rows of its
producers (with their BatchNorm entries and neurons) and the same input columns of its consumers. For a Spikformer:

- **heads** (layer `block.I.attn`, index h): output channels `h*d:(h+1)*d` of q, k and v (`d` = channels per head),
  with their BatchNorm entries and neurons, and the same input columns of the output projection. Attention has no
  softmax and a fixed scale (0.125), so head h's output depends only on its own q, k and v channels and reaches the
  rest of the block only through those projection columns.
- **mlp** (layer `block.I.mlp`, index j): output row j of fc1 with its BatchNorm entry and neuron, and input column j
  of fc2.
- **stem** (layer `patch_embed.proj_convS`, index j): output channel j of an inner patch-splitting convolution with
  its BatchNorm entry, neuron and max-pool, and input channel j of the next convolution. The last convolution's
  output is the embedding width of the residual stream, never a stem structure.

The Spike-driven Transformer and QKFormer have the same kinds over their own layers, see `structure_sites`.

A mask set removes a group when every producer row *and* every consumer column it owns is masked (False). The
consumer columns are what make the removal exact: whatever the group's neurons fire (a bias or a BatchNorm shift can
make a neuron fire with its weights at zero), it is multiplied by zero weights downstream, so the masked model computes
exactly what the model without the structure computes, and the structure can later be cut out physically. BatchNorm
entries are read for importance only; masks cover `prunable_weights()` (conv and linear weights), nothing else.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from spkprune.models.structure_sites import KINDS, Site, structure_sites

NOUNS = {"heads": "head", "mlp": "hidden channel", "stem": "channel"}


@dataclass(frozen=True)
class Slice:
    """Entries `start:stop` along dimension `dim` of the tensor `key` (0: output rows, 1: input columns)."""

    key: str
    dim: int
    start: int
    stop: int

    def index(self) -> tuple[slice, ...]:
        return (slice(None),) * self.dim + (slice(self.start, self.stop),)


@dataclass(frozen=True)
class Group:
    """One removable structure: the weight slices a mask removes and its BatchNorm scales (read-only)."""

    kind: str  # heads | mlp | stem
    layer: str  # module path: block.0.attn, block.0.mlp, stage1.0.tssa, patch_embed.proj_conv1
    index: int
    weights: tuple[Slice, ...]  # producer rows, then consumer columns
    norms: tuple[Slice, ...]  # BatchNorm gamma entries of the producer channels

    @property
    def keys(self) -> set[str]:
        return {piece.key for piece in self.weights}

    @property
    def place(self) -> str:
        """Where the structure sits, as `spkprune compact` names it: the block (`block.I`, `stageS.J`) for heads
        and MLP channels, the convolution's path for stem channels."""
        return self.layer if self.kind == "stem" else self.layer.rsplit(".", 1)[0]


# ---------------------------------------------------------------------------------------------- finding them
def structure_groups(model: nn.Module, kinds: Sequence[str] = KINDS) -> list[Group]:
    """Every structure of `kinds` in `model`, in module order (stem, then per block heads and MLP channels). Kinds
    the model's family lacks are left out; `check_kinds` refuses them when a user names them."""
    return [_group(site, unit) for site in structure_sites(model) if site.kind in kinds for unit in range(site.units)]


def _group(site: Site, unit: int) -> Group:
    start, stop = unit * site.width, (unit + 1) * site.width
    rows = tuple(Slice(f"{producer.layer}.weight", 0, start, stop) for producer in site.producers)
    columns = tuple(Slice(f"{consumer}.weight", 1, start, stop) for consumer in site.consumers)
    norms = tuple(Slice(f"{producer.norm}.weight", 0, start, stop) for producer in site.producers)
    return Group(site.kind, site.layer, unit, rows + columns, norms)


def eligible_groups(groups: Iterable[Group], keys: Iterable[str]) -> list[Group]:
    """The groups whose every weight is eligible (a group touching an excluded weight is never pruned)."""
    allowed = set(keys)
    return [group for group in groups if group.keys <= allowed]


def by_layer(groups: Iterable[Group]) -> dict[tuple[str, str], list[Group]]:
    """Groups by (kind, layer), in order."""
    layers: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        layers[(group.kind, group.layer)].append(group)
    return dict(layers)


# ------------------------------------------------------------------------------------------ what masks remove
def owned_values(group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every weight entry the group owns, flattened (producer rows, then consumer columns)."""
    return torch.cat([tensors[piece.key][piece.index()].flatten() for piece in group.weights])


def norm_scales(group: Group, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The BatchNorm scales (gamma) of the group's producer channels, flattened."""
    return torch.cat([state_dict[piece.key][piece.index()].flatten() for piece in group.norms])


def is_removed(group: Group, masks: Mapping[str, torch.Tensor]) -> bool:
    """Whether `masks` prune every weight the group owns (a weight without a mask is not pruned)."""
    return all(piece.key in masks and not bool(masks[piece.key][piece.index()].any()) for piece in group.weights)


def remove(masks: Mapping[str, torch.Tensor], groups: Iterable[Group]) -> dict[str, torch.Tensor]:
    """A copy of `masks` that also prunes every weight of `groups` (masks only shrink)."""
    out = {key: mask.clone() for key, mask in masks.items()}
    for group in groups:
        for piece in group.weights:
            out[piece.key][piece.index()] = False
    return out


def removed_structures(groups: Iterable[Group], masks: Mapping[str, torch.Tensor]) -> dict[str, dict[str, list[int]]]:
    """The groups `masks` remove, `{kind: {place: [indices]}}` in the shape of `spkprune compact`'s record:
    `{"heads": {"block.0": [1, 3]}, "mlp": {"block.1": [...]}, "stem": {"patch_embed.proj_conv1": [...]}}`.
    Kinds and places with nothing removed are left out."""
    found: dict[str, dict[str, list[int]]] = {}
    for group in groups:
        if is_removed(group, masks):
            found.setdefault(group.kind, {}).setdefault(group.place, []).append(group.index)
    return found
