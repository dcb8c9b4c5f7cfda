"""Cutting a plan's removed structures out of a state_dict and its masks: rows of the producers (weights, biases,
BatchNorm parameters and running statistics) and columns of the consumers, under the original keys."""

from __future__ import annotations

import torch
from torch import nn

from spkprune.compact.plan import STEM_SUFFIXES, Plan

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


def _layer_name(module: nn.Module, path: str, prefix: str) -> str:
    return f"{path}.{prefix}_linear" if module.conv_kind == "linear" else f"{path}.{prefix}_conv"


def _head_channels(heads: list[int], width: int) -> list[int]:
    return [head * width + i for head in heads for i in range(width)]


def cut(model: nn.Module, state_dict: dict, masks: dict, plan: Plan) -> tuple[dict, dict]:
    """The state_dict and masks of `model` without what `plan` removes (the keys stay the original ones)."""
    cutter = Cutter(state_dict, masks)
    for index, block in enumerate(model.block):
        attn, path = block.attn, f"block.{index}.attn"
        channels = _head_channels(plan.heads[index], attn.head_dim)
        for prefix in ("q", "k", "v"):
            cutter.rows(_layer_name(attn, path, prefix), f"{path}.{prefix}_bn", channels)
        cutter.columns(_layer_name(attn, path, "proj"), channels)
        mlp, path = block.mlp, f"block.{index}.mlp"
        cutter.rows(_layer_name(mlp, path, "fc1"), f"{path}.fc1_bn", plan.mlp[index])
        cutter.columns(_layer_name(mlp, path, "fc2"), plan.mlp[index])
    for stage, kept in enumerate(plan.stem):
        this, after = STEM_SUFFIXES[stage], STEM_SUFFIXES[stage + 1]
        cutter.rows(f"patch_embed.proj_conv{this}", f"patch_embed.proj_bn{this}", kept)
        cutter.columns(f"patch_embed.proj_conv{after}", kept)
    return cutter.state_dict, cutter.masks
