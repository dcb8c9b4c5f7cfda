"""Structured masks: rank whole structures (heads, MLP hidden channels, stem channels; `structures.py`) by importance
and remove exact counts of them.

Round k removes `round(n * s_k)` of the `n` eligible structures, with the level schedule of weight pruning
(`masks.sparsity_schedule`), counting those already removed (masks only shrink). A layer always keeps at least one of
its heads or channels: a schedule that would need the last one is refused before any work (`check_reachable`).

Importance of a structure (`--importance`):

- `l2` (default): the root mean square of every weight it owns across its coupled tensors, producer rows and
  consumer columns alike (its L2 norm over sqrt(number of weights), so that stem stages of different widths compare);
- `bn`: the root mean square of the BatchNorm scales |gamma| of its producer channels (network slimming, Liu et al.,
  2017): how much of the channel's normalised pre-activation training kept, data-free like `l2`.

`--scope global` puts every structure of every kind into one ranking: a score is divided by the mean score of its
layer (over the structures still there), so a head and an MLP channel compare by how they stand among their own
kind's layer. The mean is per layer rather than per kind because layers of one kind differ in scale by construction:
the stem's convolutions have fan-ins from 9 * in_channels to 9 * C/4, and their weights differ by that factor from
initialisation on (normalised per kind, the first stem stage would keep every channel and the others lose nearly
all). A layer whose structures are all alike then loses few; one with a few weak structures loses those.
`--scope layerwise` ranks each layer on its own and removes `round(n_layer * s_k)` of its structures. Ties go by
position (a stable sort over the model order), so the same weights give the same mask on every machine.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from spkprune.errors import SpkpruneError
from spkprune.pruning.structures import (
    NOUNS,
    Group,
    by_layer,
    is_removed,
    norm_scales,
    owned_values,
    remove,
)

Masks = dict[str, torch.Tensor]
IMPORTANCES = ("l2", "bn")


def removal_count(n: int, level: float) -> int:
    """How many of `n` structures a cumulative `level` removes (round half up; may be all of them, see the checks)."""
    return int(math.floor(n * level + 0.5))


# ------------------------------------------------------------------------------------------------ importance
def importance(groups: Sequence[Group], state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
               how: str = "l2") -> list[float]:
    """The score of every group (higher = more important), divided by the mean score of the groups of its layer."""
    if how not in IMPORTANCES:
        raise SpkpruneError(f"unknown --importance {how!r}; choose one of {', '.join(IMPORTANCES)}")
    raw = {id(group): _raw_score(group, state_dict, masks, how) for group in groups}
    means = {}
    for layer, members in by_layer(groups).items():
        means[layer] = sum(raw[id(group)] for group in members) / len(members)
    return [raw[id(group)] / (means[(group.kind, group.layer)] or 1.0) for group in groups]


def _raw_score(group: Group, state_dict, masks, how: str) -> float:
    if how == "bn":
        values = norm_scales(group, state_dict).detach().to(torch.float64)
    else:
        weights = owned_values(group, state_dict).detach().to(torch.float64)
        values = weights * owned_values(group, masks).to(torch.float64) if group.keys <= set(masks) else weights
    return float(values.pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------------- selection
def structured_masks(groups: Sequence[Group], state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                     level: float, scope: str = "global", how: str = "l2") -> Masks:
    """New masks that remove exactly `round(n * level)` of the `n` groups (per layer with `layerwise`), counting the
    groups `masks` remove already, by lowest importance of `state_dict`; never the last group of a layer."""
    check_reachable(groups, masks, level, scope)
    alive = [group for group in groups if not is_removed(group, masks)]
    scores = importance(alive, state_dict, masks, how)
    ranked = [alive[i] for i in sorted(range(len(alive)), key=lambda i: (scores[i], i))]
    if scope == "layerwise":
        chosen = []
        for layer_groups in by_layer(groups).values():
            members = {id(group) for group in layer_groups}
            gone = sum(is_removed(group, masks) for group in layer_groups)
            wanted = max(0, removal_count(len(layer_groups), level) - gone)
            chosen += [group for group in ranked if id(group) in members][:wanted]
    else:
        chosen = _lowest_keeping_one(groups, ranked, removal_count(len(groups), level) - (len(groups) - len(alive)))
    return remove(masks, chosen)


def _lowest_keeping_one(groups: Sequence[Group], ranked: Sequence[Group], wanted: int) -> list[Group]:
    """The first `wanted` of `ranked` (alive groups, least important first), skipping any that is the last one left
    in its layer."""
    left = {layer: len(members) for layer, members in by_layer(ranked).items()}
    chosen = []
    for group in ranked:
        if len(chosen) >= wanted:
            break
        layer = (group.kind, group.layer)
        if left[layer] > 1:
            chosen.append(group)
            left[layer] -= 1
    return chosen


def check_reachable(groups: Sequence[Group], masks: Mapping[str, torch.Tensor], level: float, scope: str) -> None:
    """SpkpruneError when `level` would need every head or channel of some layer (or no structure is eligible)."""
    if not groups:
        raise SpkpruneError("--granularity channel: no eligible structure (--structures and --exclude leave none)")
    layers = by_layer(groups)
    gone = {layer: sum(is_removed(group, masks) for group in members) for layer, members in layers.items()}
    if scope == "layerwise":
        for (kind, layer), members in layers.items():
            if removal_count(len(members), level) >= len(members) > gone[(kind, layer)]:
                raise SpkpruneError(
                    f"--granularity channel --scope layerwise: level {level:g} would remove every {NOUNS[kind]} of "
                    f"{layer} ({len(members)} of {len(members)}); each layer keeps at least one: lower --target or "
                    "--rate"
                )
        return
    room = sum(max(len(members) - 1, gone[layer]) for layer, members in layers.items())
    wanted = removal_count(len(groups), level)
    if wanted > room:
        kinds = ", ".join(sorted({group.kind for group in groups}))
        raise SpkpruneError(
            f"--granularity channel: level {level:g} would remove {wanted} of the {len(groups)} structures ({kinds}), "
            f"but each layer keeps at least one of its heads or channels, so at most {room} can go: lower --target "
            "or --rate"
        )


# ------------------------------------------------------------------------------------------------- controls
def random_structured_masks(groups: Sequence[Group], base: Mapping[str, torch.Tensor],
                            ticket: Mapping[str, torch.Tensor], seed: int) -> Masks:
    """`base` with random groups removed: in every layer as many as `ticket` removes (the random-prune control)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for members in by_layer(groups).values():
        alive = [group for group in members if not is_removed(group, base)]
        wanted = sum(is_removed(group, ticket) for group in members) - (len(members) - len(alive))
        order = torch.randperm(len(alive), generator=generator)[: max(0, wanted)]
        chosen += [alive[i] for i in order.tolist()]
    return remove(base, chosen)
