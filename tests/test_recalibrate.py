"""BatchNorm recalibration (`spkprune.training.recalibrate`): the running statistics become the plain average over the
calibration batches, nothing else of the model changes, and 0 batches does nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spkprune.models import create_model
from spkprune.training.recalibrate import batchnorms, recalibrate_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3), nn.ReLU(), nn.Linear(4, 2))


def _batches(count: int = 3, size: int = 5) -> DataLoader:
    """`count` fixed batches of different scales and offsets, in order (a loader without automatic batching)."""
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(size, 3, generator=generator) * (i + 1) + i, torch.zeros(size, dtype=torch.long))
               for i in range(count)]
    return DataLoader(batches, batch_size=None)


def test_statistics_are_the_average_over_the_batches_and_nothing_else_changes():
    net, batches = _net(), _batches()
    net.eval()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    seen = recalibrate_batchnorm(net, batches, len(batches))
    batches = list(batches)

    inputs = [net[0](images).detach() for images, _ in batches]  # what the BatchNorm saw, batch by batch
    means = torch.stack([x.mean(0) for x in inputs]).mean(0)
    variances = torch.stack([x.var(0, unbiased=True) for x in inputs]).mean(0)  # PyTorch keeps the unbiased one
    norm = net[1]
    assert seen == 15
    assert torch.allclose(norm.running_mean, means, atol=1e-6)
    assert torch.allclose(norm.running_var, variances, atol=1e-6)
    assert int(norm.num_batches_tracked) == 3
    assert norm.momentum == 0.3 and not net.training  # momentum and mode restored
    assert all(torch.equal(net.state_dict()[k], v) for k, v in weights.items())


def test_only_the_first_batches_count_and_training_mode_is_restored():
    net, batches = _net(), list(_batches(count=4))
    net.train()
    recalibrate_batchnorm(net, DataLoader(batches, batch_size=None), 2)
    first_two = torch.stack([net[0](images).detach().mean(0) for images, _ in batches[:2]]).mean(0)
    assert torch.allclose(net[1].running_mean, first_two, atol=1e-6) and net.training


def test_zero_batches_changes_nothing():
    net = _net()
    net[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_batchnorm(net, _batches(), 0) == 0
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_a_dataset_is_batched_and_a_spikformer_is_recalibrated_in_place():
    torch.manual_seed(0)
    model = create_model("spikformer-2-64-digits", timesteps=2, embed_dim=32, num_heads=2).eval()
    norms = batchnorms(model)
    assert norms
    before = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    data = TensorDataset(torch.rand(12, 1, 8, 8), torch.zeros(12, dtype=torch.long))
    assert recalibrate_batchnorm(model, data, 2, batch_size=4) == 8
    # Every variance moves off its initial 1 (a BatchNorm that no spike reaches at initialisation sees only zeros).
    assert all(not torch.equal(n.running_var, var) for n, (_, var) in zip(norms, before))
    assert all(int(n.num_batches_tracked) == 2 for n in norms) and not model.training
    assert recalibrate_batchnorm(model, DataLoader(data, batch_size=6), 5) == 12  # a loader ends before 5 batches
