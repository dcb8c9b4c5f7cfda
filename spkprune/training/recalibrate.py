"""BatchNorm recalibration: re-estimate every BatchNorm's running statistics on a few training batches.

Pruning without retraining (one-shot pruning, sensitivity scans) changes what each BatchNorm sees, while its running
mean and variance still describe the dense model; that mismatch, not the lost weights, is most of the accuracy a
one-shot pruned spiking model loses. Recalibration runs forward passes in training mode with no gradient and no weight
update, using the cumulative average (momentum None) so the result does not depend on the batch order's last batches.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spkprune.data.loader import make_loader
from spkprune.training.distributed import unwrap

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in unwrap(model).modules() if isinstance(m, _NORMS) and m.track_running_stats]


def recalibrate_batchnorm(
    model: nn.Module,
    data: Dataset | DataLoader,
    batches: int,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> int:
    """Replace the running statistics of every BatchNorm of `model` by their average over `batches` batches of `data`
    (weights untouched, the model left in the mode it was in); returns the number of images seen. `batches` 0 does
    nothing."""
    norms = batchnorms(model)
    if batches <= 0 or not norms:
        return 0
    loader = data if isinstance(data, DataLoader) else make_loader(data, batch_size, train=True, distributed=False)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    saved = [(norm, norm.momentum) for norm in norms]
    was_training = model.training
    seen = 0
    try:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average over the calibration batches
        model.train()
        with torch.no_grad():
            for images, _targets in itertools.islice(loader, batches):
                model(images.to(device, non_blocking=True))
                seen += len(images)
    finally:
        for norm, momentum in saved:
            norm.momentum = momentum
        model.train(was_training)
    return seen
