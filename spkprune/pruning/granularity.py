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
from spkprune.sensitivity.allocation import (
    Curve,
    allocate,
    curves_of,
    predicted_drop,
    scan_ref,
    stored_scan,
)
from spkprune.store import Artifact, Store

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

    def identity(self) -> dict:
        """What the strategy adds to the run's identity beyond the settings (nothing, unless it reads a scan)."""
        return {}

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

    def identity(self) -> dict:
        return {}

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


@dataclass
class AllocatedPruning(WeightPruning):
    """Single weights by magnitude, with per-layer counts from a sensitivity scan (`--allocation sensitivity`):
    exactly `round(n * level)` of the `n` eligible weights in all, spread over the layers with the least predicted
    top-1 drop (`spkprune.sensitivity.allocation`). A higher level only adds to what a lower one prunes."""

    curves: dict[str, Curve]  # per eligible key, from the scan
    scan: str  # where the scan is stored
    scan_sha256: str  # which scan: a run resumed after the scan was replaced would prune by other counts

    def identity(self) -> dict:
        return {"allocation_scan_sha256": self.scan_sha256}

    def check(self, base: Mapping[str, torch.Tensor], levels: Sequence[float]) -> None:
        already = M.count_pruned({key: base[key] for key in self.eligible})
        if already:
            raise SpkpruneError(f"--allocation sensitivity starts from an unpruned checkpoint; the source prunes "
                                f"{already} eligible weights already (use --allocation uniform)")
        self.counts(levels[-1])  # a level the scanned layers cannot take is refused before any work

    def counts(self, level: float) -> dict[str, int]:
        total = sum(curve.size for curve in self.curves.values())
        return allocate(self.curves, M.pruned_count(total, level))

    def prune(self, state_dict: Mapping[str, torch.Tensor], masks: Masks, level: float) -> Masks:
        return {**masks, **M.counted_magnitude_masks(state_dict, masks, self.counts(level))}

    def describe(self, masks: Mapping[str, torch.Tensor]) -> dict:
        counts = {key: M.count_pruned({key: masks[key]}) if key in masks else 0 for key in self.eligible}
        allocation = {"scan": self.scan, "predicted_drop": predicted_drop(self.curves, counts),
                      "layer_sparsity": {key: counts[key] / self.curves[key].size for key in self.eligible}}
        return {**super().describe(masks), "allocation": allocation}


Pruning = WeightPruning | ChannelPruning | AllocatedPruning


def layer_curves(store: Store, source: Artifact, eligible: Sequence[str]) -> dict[str, Curve]:
    """The drop curve of every eligible weight from the stored layer scan of `source` (one line when it is missing
    or does not cover them)."""
    curves = curves_of(stored_scan(store, source, "layers", "--allocation sensitivity"))
    missing = [key for key in eligible if key not in curves]
    if missing:
        raise SpkpruneError(f"the sensitivity scan of {source.ref} does not cover {missing[0]}; run spkprune "
                            f"sensitivity {source.ref} --over layers again")
    return {key: curves[key] for key in eligible}


def pruning_strategy(settings: ImpSettings, structures: Sequence[Group], eligible: list[str],
                     store: Store | None = None, source: Artifact | None = None) -> Pruning:
    """The strategy `settings` choose, over the `eligible` weights of a model with `structures` (`store` and
    `source`: where the sensitivity scan of `--allocation sensitivity` is)."""
    if settings.allocation == "sensitivity":
        curves = layer_curves(store, source, eligible)  # one line when there is no scan
        scan = store.resolve(scan_ref(source, "layers"))
        return AllocatedPruning(eligible, settings.scope, structures, curves, scan.ref, scan.sha256)
    if settings.granularity == "weight":
        return WeightPruning(eligible, settings.scope, structures)
    chosen = [group for group in structures if group.kind in settings.structures]
    groups = eligible_groups(chosen, eligible)
    return ChannelPruning(groups, settings.scope, settings.importance, structures)
