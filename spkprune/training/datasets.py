"""The data sets a model trains and is tested on, and whether the model fits them."""

from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from spkprune.data import dataset_info, get_dataset
from spkprune.errors import SpkpruneError
from spkprune.training.config import TrainConfig


def check_compatible(model: nn.Module, dataset: str) -> None:
    """The model's classes, channels and image size must fit the data set."""
    info, cfg = dataset_info(dataset), model.config
    wanted = {"num_classes": info.num_classes, "in_channels": info.in_channels, "img_size": info.img_size}
    wrong = {k: (getattr(cfg, k), v) for k, v in wanted.items() if getattr(cfg, k) != v}
    if wrong:
        detail = ", ".join(f"{k} {have} (needs {need})" for k, (have, need) in wrong.items())
        raise SpkpruneError(
            f"model {getattr(model, 'preset', None) or 'model'} does not fit dataset {dataset}: {detail}; "
            f"use a {dataset} preset such as {info.default_preset}"
        )


def train_test_splits(
    cfg: TrainConfig, model: nn.Module, train_data: Dataset | None = None, test_data: Dataset | None = None
) -> tuple[Dataset, Dataset]:
    """The train split (augmented as `cfg.augment` says) and the test split of `cfg.dataset` at the model's time
    steps; a split given as `train_data` / `test_data` is used as it is."""
    timesteps = getattr(getattr(model, "config", None), "timesteps", None)
    if train_data is None:
        train_data = get_dataset(cfg.dataset, "train", cfg.data_dir, timesteps=timesteps, augment=cfg.augment)
    if test_data is None:
        test_data = get_dataset(cfg.dataset, "test", cfg.data_dir, timesteps=timesteps, augment=False)
    return train_data, test_data
