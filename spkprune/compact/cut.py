"""Cutting a plan's removed structures out of a state_dict and its masks: rows of the producers (weights, biases,
BatchNorm parameters and running statistics) and columns of the consumers, under the original keys."""

from __future__ import annotations

import torch

from spkprune.compact.plan import Plan

_NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var")


class Cutter:
    """A state_dict and its masks, narrowed in place one layer at a time."""

    def __init__(self, state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]):
        self.state_dict, self.masks = dict(state_dict), dict(masks)

    def _take(self, key: str, dim: int, index: torch.Tensor) -> None:
        if key in self.state_dict:
            self.state_dict[key] = self.state_dict[key].index_select(dim, index).contiguous()
        if key in self.masks:
            self.masks[key] = self.masks[key].index_select(dim, index).contiguous()

    def rows(self, layer: str, norm: str, index: list[int]) -> None:
        """Keep output channels `index` of `layer` (weight and bias) and of its BatchNorm `norm`."""
        kept = torch.tensor(index, dtype=torch.long)
        self._take(f"{layer}.weight", 0, kept)
        self._take(f"{layer}.bias", 0, kept)
        for entry in _NORM_ENTRIES:
            self._take(f"{norm}.{entry}", 0, kept)

    def columns(self, layer: str, index: list[int]) -> None:
        """Keep input channels `index` of `layer`."""
        self._take(f"{layer}.weight", 1, torch.tensor(index, dtype=torch.long))

    def units(self, key: str, index: list[int]) -> None:
        """Keep entries `index` of `key` along its first two dimensions (a tensor indexed by structure)."""
        kept = torch.tensor(index, dtype=torch.long)
        for dim in (0, 1):
            self._take(key, dim, kept)


def cut(state_dict: dict, masks: dict, plan: Plan) -> tuple[dict, dict]:
    """The state_dict and masks without what `plan` removes (the keys stay the original ones)."""
    cutter = Cutter(state_dict, masks)
    for site, kept in zip(plan.sites, plan.kept):
        channels = site.channels(kept)
        for producer in site.producers:
            cutter.rows(producer.layer, producer.norm, channels)
        for consumer in site.consumers:
            cutter.columns(consumer, channels)
        for key in site.unit_tensors:
            cutter.units(key, kept)
    return cutter.state_dict, cutter.masks
