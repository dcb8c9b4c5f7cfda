"""What a lottery round prunes: single weights by magnitude (`--granularity weight`) or whole structures
(`--granularity channel`: heads, MLP hidden channels, stem channels; `structures.py`, `structured.py`).

Both produce the same thing, ordinary weight masks over the eligible weights (`masks.py`), so everything downstream
(training, export, counting) works unchanged, and one granularity can follow the other: a source that is already
pruned keeps its masks (masks only shrink), and its pruned weights or removed structures count towards the level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from spkprune.errors import SpkpruneError
from spkprune.pruning import masks as M
from spkprune.pruning.settings import ImpSettings
from spkprune.pruning.structured import check_reachable, random_structured_masks, structured_masks
from spkprune.pruning.structures import Group, eligible_groups, is_removed, removed_structures

Masks = dict[str, torch.Tensor]


@dataclass
class WeightPruning:
    """Single weights by magnitude, `round(n * level)` of the `n` eligible weights (globally or per tensor)."""

    eligible: list[str]
    scope: str
    structures: Sequence[Group]  # every structure of the model, to report the ones the masks remove whole

    def check(self, base: Mapping[str, torch.Tensor], levels: Sequence[float]) -> None:
        """A pruned source: the schedule must end above what it prunes already."""
        ranked = {key: base[key] for key in self.eligible}
        already, total = M.count_pruned(ranked), sum(mask.numel() for mask in ranked.values())
        if already and M.pruned_count(total, levels[-1]) <= already:
            raise SpkpruneError(
                f"the source prunes {already / total:.4g} of the eligible weights already; --target (or the last "
                f"level of --rate, {levels[-1]:.4g}) must lie above it"
            )

    def prune(self, state_dict: Mapping[str, torch.Tensor], masks: Masks, level: float) -> Masks:
        """Round `level`'s masks; what a pruned source prunes beyond `level` already stays as it is."""
        ranked = {key: masks[key] for key in self.eligible}
        if self.scope == "layerwise":
            ranked = {key: mask for key, mask in ranked.items()
                      if M.pruned_count(mask.numel(), level) > M.count_pruned({key: mask})}
        elif M.pruned_count(sum(mask.numel() for mask in ranked.values()), level) <= M.count_pruned(ranked):
            ranked = {}
        return {**masks, **(M.magnitude_masks(state_dict, ranked, level, self.scope) if ranked else {})}

    def random_like(self, base: Masks, ticket: Masks, seed: int) -> Masks:
        """The random-prune control: random masks with the ticket's per-tensor counts."""
        return M.random_masks_like(ticket, seed)

    def describe(self, masks: Mapping[str, torch.Tensor]) -> dict:
        """What a round's `meta["imp"]` says about its masks (and the structures they remove whole, if any)."""
        removed = removed_structures(self.structures, masks)
        return {"granularity": "weight", **({"structures_removed": removed} if removed else {})}

    def summary(self, masks: Mapping[str, torch.Tensor]) -> str:
        ranked = {key: masks[key] for key in self.eligible}
        share = M.count_pruned(ranked) / sum(mask.numel() for mask in ranked.values())
        return f"{share:.2%} of the eligible weights pruned"


@dataclass
class ChannelPruning:
    """Whole structures by importance, `round(n * level)` of the `n` eligible structures (globally or per layer)."""

    groups: list[Group]  # the eligible structures of the chosen kinds
    scope: str
    importance: str
    structures: Sequence[Group]  # every structure of the model, for the report

    def check(self, base: Mapping[str, torch.Tensor], levels: Sequence[float]) -> None:
        check_reachable(self.groups, base, levels[-1], self.scope)

    def prune(self, state_dict: Mapping[str, torch.Tensor], masks: Masks, level: float) -> Masks:
        return structured_masks(self.groups, state_dict, masks, level, self.scope, self.importance)

    def random_like(self, base: Masks, ticket: Masks, seed: int) -> Masks:
        """The random-prune control: random structures, as many per layer as the ticket removes, on `base`."""
        return random_structured_masks(self.groups, base, ticket, seed)

    def describe(self, masks: Mapping[str, torch.Tensor]) -> dict:
        return {
            "granularity": "channel",
            "structures_removed": removed_structures(self.structures, masks),
            "structures_pruned": self.removed(masks),
            "structures_eligible": len(self.groups),
        }

    def summary(self, masks: Mapping[str, torch.Tensor]) -> str:
        return f"{self.removed(masks)} of {len(self.groups)} structures removed"

    def removed(self, masks: Mapping[str, torch.Tensor]) -> int:
        return sum(is_removed(group, masks) for group in self.groups)


Pruning = WeightPruning | ChannelPruning


def pruning_strategy(settings: ImpSettings, structures: Sequence[Group], eligible: list[str]) -> Pruning:
    """The strategy `settings` choose, over the `eligible` weights of a model with `structures`."""
    if settings.granularity == "weight":
        return WeightPruning(eligible, settings.scope, structures)
    chosen = [group for group in structures if group.kind in settings.structures]
    groups = eligible_groups(chosen, eligible)
    return ChannelPruning(groups, settings.scope, settings.importance, structures)
