"""Data sets: `digits` (embedded), `cifar10` / `cifar100` (local python-pickle layout), `cifar10-dvs` /
`dvs128-gesture` (local spikingjelly roots). Nothing is ever downloaded."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from spkprune.data.info import DatasetInfo, dataset_info, list_datasets
from spkprune.data.loader import make_loader
from spkprune.errors import SpkpruneError

SPLITS = ("train", "test")


def get_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    timesteps: int | None = None,
    augment: bool = False,
    img_size: int | None = None,
) -> Dataset:
    """One split of a data set; `timesteps` is the number of event frames (event data sets only), `img_size` the side
    the images or frames are resized to (data sets whose inputs can be resized; default: the data set's own)."""
    info = dataset_info(name)
    img_size = img_size if img_size is not None and info.resizable else info.img_size
    if split not in SPLITS:
        raise SpkpruneError(f"unknown split {split!r}; choose train or test")
    # Each data set's module pulls in its own heavy dependency (scikit-learn, torchvision's ImageFolder,
    # spikingjelly), so only the one asked for is imported.
    if name == "digits":
        from spkprune.data.digits import DigitsDataset

        return DigitsDataset(split, augment=augment)
    if name in ("cifar10", "cifar100"):
        from spkprune.data.cifar import CifarDataset

        return CifarDataset(name, split, data_dir, augment=augment)
    if name == "imagenet":
        from spkprune.data.imagenet import imagenet_dataset

        return imagenet_dataset(split, data_dir, img_size, augment=augment)
    from spkprune.data.dvs import EventFramesDataset

    return EventFramesDataset(
        name, split, data_dir, timesteps or info.default_timesteps, img_size, augment=augment
    )


__all__ = ["DatasetInfo", "dataset_info", "get_dataset", "list_datasets", "make_loader", "SPLITS"]
