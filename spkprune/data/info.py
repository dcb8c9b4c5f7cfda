"""What each supported data set is: classes, input shape, whether it is event frames, and its default preset."""

from __future__ import annotations

from dataclasses import dataclass

from spkprune.errors import SpkpruneError


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    img_size: int
    is_event: bool
    default_preset: str
    default_timesteps: int

    @property
    def resizable(self) -> bool:
        """Its inputs are resized to the model's image size (event frames by area pooling, ImageNet by its
        transform), so a model made for a smaller size fits it: the Spike-driven Transformer's CIFAR10-DVS models
        take 64x64 frames of the 128x128 sensor."""
        return self.is_event or self.name == "imagenet"


_INFO = {
    "digits": DatasetInfo("digits", 10, 1, 8, False, "spikformer-2-64-digits", 4),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, False, "spikformer-4-384-cifar10", 4),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, False, "spikformer-4-384-cifar100", 4),
    "cifar10-dvs": DatasetInfo("cifar10-dvs", 10, 2, 128, True, "spikformer-2-256-cifar10dvs", 16),
    "dvs128-gesture": DatasetInfo("dvs128-gesture", 11, 2, 128, True, "spikformer-2-256-dvs128", 16),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, False, "spikformer-8-512-imagenet", 4),
}


def list_datasets() -> list[str]:
    return list(_INFO)


def dataset_info(name: str) -> DatasetInfo:
    try:
        return _INFO[name]
    except KeyError:
        raise SpkpruneError(f"unknown dataset {name!r}; choose one of {', '.join(_INFO)}") from None
