"""DataLoaders with a seeded generator, and a DistributedSampler when a process group is running."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool | None = None,
    distributed: bool | None = None,
) -> DataLoader:
    """Shuffled (train) or ordered (eval) batches.

    Shuffling comes from a loader-owned generator seeded with `seed` (or, distributed, from the sampler's
    seed + epoch: call `loader.sampler.set_epoch(epoch)`), so an epoch's order does not depend on how much global
    randomness the model consumed. Training drops the last partial batch, as timm does.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    drop_last = train if drop_last is None else drop_last
    # Never more workers than usable CPUs: the original recipes ask for 4, which only thrashes a 2-core machine.
    num_workers = min(num_workers, _usable_cpus())
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
