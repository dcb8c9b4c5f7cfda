"""Untrained models that fire: random weights barely spike, so the selector and token tests widen BatchNorm gains."""

from __future__ import annotations

import torch
from torch import nn

_NORM = nn.modules.batchnorm._BatchNorm


def amplified(model: nn.Module) -> nn.Module:
    """BatchNorm gains in [1, 3] and running variances of 0.05: untrained convolutions give small outputs, and this
    makes every layer spike (no data needed; the model stays in the mode it is in)."""
    for module in model.modules():
        if isinstance(module, _NORM):
            torch.nn.init.uniform_(module.weight, 1.0, 3.0)
            module.running_var.fill_(0.05)
    return model


def lively(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm gains in [1, 3] and running statistics from one batch of `images`: every layer fires; eval mode."""
    for module in model.modules():
        if isinstance(module, _NORM):
            module.momentum = None
            torch.nn.init.uniform_(module.weight, 1.0, 3.0)
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()
