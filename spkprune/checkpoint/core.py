"""The Checkpoint: a state_dict, bool masks for its pruned tensors, JSON metadata, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch


@dataclass
class Checkpoint:
    """Weights (original Spikformer keys), bool masks for pruned tensors, JSON metadata, and where it came from."""

    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    ref: str | None = None

    @property
    def arch(self) -> str | None:
        return self.meta.get("arch")

    def validate(self) -> None:
        """ValueError unless every mask is bool, names a tensor of the state_dict and has its shape."""
        problem = mask_mismatch(self.masks, self.state_dict)
        if problem:
            raise ValueError(problem)
        for key, mask in self.masks.items():
            if mask.dtype != torch.bool:
                raise ValueError(f"mask {key!r} must be torch.bool, got {mask.dtype}")


def mask_mismatch(masks: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first mask that names no tensor of `tensors` or has another shape, as a message; None when all fit."""
    for key, mask in masks.items():
        if key not in tensors:
            return f"mask {key!r} matches no weight of the model"
        if tuple(mask.shape) != tuple(tensors[key].shape):
            return f"mask {key!r} has shape {list(mask.shape)}, its weight {list(tensors[key].shape)}"
    return None
