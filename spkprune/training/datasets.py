"""The data sets a model trains and is tested on, and whether the model fits them."""

from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from spkprune.data import dataset_info, get_dataset
from spkprune.errors import SpkpruneError
from spkprune.models import family_of
from spkprune.training.config import TrainConfig


def _fit_problems(cfg, dataset: str) -> dict:
    """{field: (the model's, the data set's)} for the classes, channels and image size that differ."""
    info = dataset_info(dataset)
    wanted = {"num_classes": info.num_classes, "in_channels": info.in_channels, "img_size": info.img_size}
    problems = {k: (getattr(cfg, k), v) for k, v in wanted.items() if getattr(cfg, k) != v}
    if info.resizable and cfg.img_size <= info.img_size:  # inputs are resized down to the model's size
        problems.pop("img_size", None)
    return problems


def suggested_preset(model: nn.Module, dataset: str) -> str:
    """The data set's default preset when it is of the model's family, else a preset of that family made for
    `dataset` and fitting it, else the default preset."""
    family, default = family_of(model), dataset_info(dataset).default_preset
    fitting = [p for p in family.list() if family.presets[p].dataset == dataset
               and not _fit_problems(family.presets[p], dataset)]
    return default if default in family.presets or not fitting else fitting[0]


def check_compatible(model: nn.Module, dataset: str) -> None:
    """The model's classes, channels and image size must fit the data set (any family: they are config fields)."""
    wrong = _fit_problems(model.config, dataset)
    if wrong:
        detail = ", ".join(f"{k} {have} (needs {need})" for k, (have, need) in wrong.items())
        raise SpkpruneError(
            f"model {getattr(model, 'preset', None) or 'model'} does not fit dataset {dataset}: {detail}; "
            f"use a {dataset} preset such as {suggested_preset(model, dataset)}"
        )


def train_test_splits(
    cfg: TrainConfig, model: nn.Module, train_data: Dataset | None = None, test_data: Dataset | None = None
) -> tuple[Dataset, Dataset]:
    """The train split (augmented as `cfg.augment` says) and the test split of `cfg.dataset` at the model's time
    steps; a split given as `train_data` / `test_data` is used as it is."""
    config = getattr(model, "config", None)
    shape = {"timesteps": getattr(config, "timesteps", None), "img_size": getattr(config, "img_size", None)}
    if train_data is None:
        train_data = get_dataset(cfg.dataset, "train", cfg.data_dir, augment=cfg.augment, **shape)
    if test_data is None:
        test_data = get_dataset(cfg.dataset, "test", cfg.data_dir, augment=False, **shape)
    return train_data, test_data
