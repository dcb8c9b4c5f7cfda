"""CIFAR10-DVS and DVS128 Gesture through spikingjelly's dataset classes, from a local root. Nothing is downloaded.

spikingjelly reads `ROOT/events_np/` (events converted from the original archives) and integrates them once into
`ROOT/frames_number_T_split_by_number/` (a cache of `.npz` files holding `frames` `[T, 2, 128, 128]`). spkprune
accepts either of the two; where spikingjelly would start a download, it raises one clear error instead.
CIFAR10-DVS has no official split: the first 90% of each class (in file order) is the training set, as in the
Spikformer script.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import Dataset

from spkprune.data.augment import SNNAugmentWide
from spkprune.errors import SpkpruneError

CIFAR10DVS_TRAIN_FRACTION = 0.9
_SPLIT_BY = "number"


def _frames_dir(root: Path, timesteps: int) -> Path:
    return root / f"frames_number_{timesteps}_split_by_{_SPLIT_BY}"


def _no_download_class(base: type, name: str, timesteps: int, layout_hint: str) -> type:
    """A subclass of a spikingjelly data set whose preparation step refuses to download."""

    def prepare_raw_dataset(self) -> None:
        if self.raw_root.exists() or _frames_dir(self.cfg.root, timesteps).exists():
            return
        raise SpkpruneError(
            f"{name} not found under {self.cfg.root}: put spikingjelly's converted events in "
            f"{self.raw_root}/ or the frame cache in {_frames_dir(self.cfg.root, timesteps)}/ ({layout_hint})"
        )

    return type(f"Local{base.__name__}", (base,), {"prepare_raw_dataset": prepare_raw_dataset})


def _open_spikingjelly(name: str, root: Path, timesteps: int, train: bool | None):
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS  # slow to import; only event data sets need them
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

    if name == "cifar10-dvs":
        cls = _no_download_class(CIFAR10DVS, name, timesteps, "events_np/<class>/<sample>.npz")
        kwargs = {}
    else:
        cls = _no_download_class(DVS128Gesture, name, timesteps, "events_np/{train,test}/<label>/<sample>.npz")
        kwargs = {"train": train}
    try:
        return cls(str(root), data_type="frame", frames_number=timesteps, split_by=_SPLIT_BY, **kwargs)
    except (FileNotFoundError, RuntimeError) as err:
        # RuntimeError: an interrupted spikingjelly conversion left a `.building` marker; its message says what to remove.
        raise SpkpruneError(f"{name} under {root} cannot be read: {err}".replace("\n", " ")) from None


def _class_split(targets: list[int], split: str) -> list[int]:
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    indices: list[int] = []
    for members in by_class.values():
        cut = int(len(members) * CIFAR10DVS_TRAIN_FRACTION)
        indices.extend(members[:cut] if split == "train" else members[cut:])
    return sorted(indices)


class EventFramesDataset(Dataset):
    """Event frames as float `[T, 2, size, size]`; training adds a per-sample hflip and one SNNAugmentWide op."""

    def __init__(self, name: str, split: str, data_dir, timesteps: int, img_size: int, augment: bool = False):
        if data_dir is None:
            raise SpkpruneError(f"{name} needs --data-dir ROOT, a spikingjelly root with events_np/ inside")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise SpkpruneError(f"{name} data directory {root} does not exist; create it with events_np/ inside")
        self.folder = _open_spikingjelly(name, root, timesteps, train=(split == "train"))
        if len(self.folder) == 0:
            raise SpkpruneError(f"{name} under {root} has no samples; check {self.folder.root}")
        targets = list(self.folder.targets)
        self.indices = _class_split(targets, split) if name == "cifar10-dvs" else list(range(len(targets)))
        self.targets = torch.tensor([targets[i] for i in self.indices], dtype=torch.int64)
        self.img_size = img_size
        self.augment = T.Compose([T.RandomHorizontalFlip(0.5), SNNAugmentWide()]) if augment else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        frames, label = self.folder[self.indices[index]]
        frames = torch.as_tensor(frames, dtype=torch.float32)
        if frames.shape[-1] != self.img_size or frames.shape[-2] != self.img_size:
            frames = torch.nn.functional.interpolate(frames, size=(self.img_size, self.img_size), mode="area")
        if self.augment is not None:
            frames = self.augment(frames)
        return frames, int(label)
