"""The scan itself: prune one unit at a time at each ratio, evaluate without retraining, put the model back.

A unit is what one probe prunes, with its `size` (how many entries it has) and `cap` (the most that may go):

- `layers`: one prunable weight tensor; `round(numel * ratio)` of its weights by magnitude (exact count, `masks.py`);
- `structures`: the heads, MLP hidden channels or stem channels of one layer (`structures.py`); `round(n * ratio)`
  of them by L2 importance (`structured.py`), always leaving one;
- `locations`: the tokens before one block; a firing-rate token selector there alone, keeping
  `int(N * (1 - ratio))` tokens and at least one.

Every probe starts from the source's weights and BatchNorm statistics and is measured the same way as the unpruned
model (with the same BatchNorm recalibration, if any), so a probe that prunes nothing has exactly zero drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from spkprune.models.selector import attach_selectors, detach_selectors, tokens_kept
from spkprune.pruning import masks as M
from spkprune.pruning.structured import importance, removal_count
from spkprune.pruning.structures import by_layer, is_removed, remove, structure_groups
from spkprune.training import evaluate
from spkprune.training.recalibrate import recalibrate_batchnorm

Log = Callable[[str], None]
Weights = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Unit:
    name: str
    size: int
    cap: int


class LayerProbes:
    """One prunable weight tensor at a time, by magnitude."""

    def __init__(self, state_dict: Weights, masks: Weights):
        self.state_dict, self.masks = state_dict, masks  # masks: every prunable key (all True where not pruned)

    def units(self) -> list[Unit]:
        return [Unit(key, mask.numel(), mask.numel() - 1) for key, mask in self.masks.items()]

    def apply(self, model: nn.Module, unit: Unit, ratio: float) -> int:
        mask = self.masks[unit.name]
        count = max(M.pruned_count(mask.numel(), ratio), M.count_pruned({unit.name: mask}))
        new = M.counted_magnitude_masks(self.state_dict, self.masks, {unit.name: count})
        model.load_state_dict(M.apply_masks(dict(self.state_dict), new), strict=True)
        return count

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.state_dict, strict=True)


class StructureProbes(LayerProbes):
    """The structures of one layer at a time (heads of block.I.attn, hidden channels of block.I.mlp, ...)."""

    def __init__(self, model: nn.Module, state_dict: Weights, masks: Weights):
        super().__init__(state_dict, masks)
        self.layers = {f"{kind} {layer}": groups for (kind, layer), groups in by_layer(structure_groups(model)).items()}

    def units(self) -> list[Unit]:
        return [Unit(name, len(groups), len(groups) - 1) for name, groups in self.layers.items()]

    def apply(self, model: nn.Module, unit: Unit, ratio: float) -> int:
        groups = self.layers[unit.name]
        alive = [group for group in groups if not is_removed(group, self.masks)]
        count = max(min(removal_count(len(groups), ratio), unit.cap), len(groups) - len(alive))
        scores = importance(alive, self.state_dict, self.masks, "l2")
        ranked = [alive[i] for i in sorted(range(len(alive)), key=lambda i: (scores[i], i))]
        new = remove(self.masks, ranked[: count - (len(groups) - len(alive))])
        model.load_state_dict(M.apply_masks(dict(self.state_dict), new), strict=True)
        return count


class LocationProbes:
    """A firing-rate token selector before one block at a time (the model carries no selector otherwise)."""

    def __init__(self, model: nn.Module, state_dict: Weights):
        self.state_dict, self.tokens = state_dict, model.num_tokens
        self.locations = model.selector_locations()

    def units(self) -> list[Unit]:
        return [Unit(f"block {loc}", self.tokens, self.tokens - 1) for loc in self.locations]

    def apply(self, model: nn.Module, unit: Unit, ratio: float) -> int:
        kept = max(1, tokens_kept(self.tokens, 1 - ratio))
        location = int(unit.name.split()[1])
        attach_selectors(model, {"locations": [location], "keep": [kept / self.tokens], "scorer": "firing-rate"})
        return self.tokens - kept

    def restore(self, model: nn.Module) -> None:
        detach_selectors(model)
        model.load_state_dict(self.state_dict, strict=True)


Probes = LayerProbes | StructureProbes | LocationProbes


@dataclass
class Measure:
    """Top-1 of a model on the test images, after re-estimating BatchNorm statistics on `recalibrate` batches."""

    test: Dataset
    train: Dataset | None
    recalibrate: int
    batch_size: int
    amp: bool
    dataset: str = ""

    def __call__(self, model: nn.Module) -> float:
        if self.recalibrate:
            recalibrate_batchnorm(model, self.train, self.recalibrate, batch_size=self.batch_size)
        return float(evaluate(model, self.test, self.batch_size, record_firing=False, amp=self.amp)["top1"])


def run_scan(model: nn.Module, probes: Probes, ratios: Sequence[float], measure: Measure,
             log: Log = lambda message: None) -> tuple[float, list[dict]]:
    """The unpruned top-1 and one row per unit and ratio: `{unit, size, cap, ratio, pruned, sparsity, top1, drop}`
    (drop = unpruned top-1 minus the probe's, in fractions). The model is left as it came."""
    base = measure(model)
    probes.restore(model)
    rows = []
    for unit in probes.units():
        for ratio in ratios:
            pruned = probes.apply(model, unit, ratio)
            top1 = measure(model)
            probes.restore(model)
            rows.append({"unit": unit.name, "size": unit.size, "cap": unit.cap, "ratio": ratio, "pruned": pruned,
                         "sparsity": pruned / unit.size, "top1": top1, "drop": base - top1})
        worst = max(row["drop"] for row in rows[-len(ratios):])
        log(f"{unit.name}: drop up to {100 * worst:.1f} points")
    return base, rows
