"""CIFAR-10 / CIFAR-100 from the official "python version" archives, extracted under a local directory.

The official format is a pickled dict per batch file; it is read with `pickle.load(f, encoding="bytes")`, as
torchvision does. This is the only place spkprune unpickles anything, and only these well-known file names.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spkprune.data.augment import cifar_transform
from spkprune.errors import SpkpruneError

_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


def _batch_files(name: str, split: str, data_dir: str | Path | None) -> list[Path]:
    layout = _LAYOUT[name]
    expected = f"{layout['folder']}/{{{','.join(layout['train'] + layout['test'])}}}"
    hint = f"download {layout['url']}, extract it under DIR and pass --data-dir DIR"
    if data_dir is None:
        raise SpkpruneError(f"{name} needs --data-dir DIR containing {expected}; {hint}")
    root = Path(data_dir).expanduser()
    folder = root if root.name == layout["folder"] else root / layout["folder"]
    files = [folder / f for f in layout[split]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SpkpruneError(f"{name} not found: {folder} lacks {', '.join(missing)} (expected {expected}); {hint}")
    return files


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    try:
        images = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as err:
        raise SpkpruneError(f"{path} is not a CIFAR python batch file ({err}); re-extract the official archive") from None
    return images, labels


class CifarDataset(Dataset):
    """CIFAR images as uint8 in memory; each item is a normalised float `[3,32,32]` (augmented for training)."""

    def __init__(self, name: str, split: str, data_dir: str | Path | None, augment: bool = False):
        layout = _LAYOUT[name]
        batches = [_read_batch(path, layout["label_key"]) for path in _batch_files(name, split, data_dir)]
        self.images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
        self.targets = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        self.transform = cifar_transform(layout["mean"], layout["std"], augment)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])
