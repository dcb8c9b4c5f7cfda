"""CIFAR-10 / CIFAR-100 from the official "python version" archives, extracted under a local directory.

The official format is a Python 2 pickle (protocol 2) of a dict per batch file, read with `encoding="bytes"` as
torchvision does, but through an unpickler that builds only plain data and numpy arrays: a crafted batch file is
refused before anything it names is imported or called.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spkprune.data.augment import cifar_transform
from spkprune.data.safe_pickle import RefusedGlobal, load_plain_data
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


def _read_batch(path: Path, layout: dict) -> tuple[np.ndarray, np.ndarray]:
    advice = f"re-download {layout['url']} and extract it"
    entry = _unpickle_batch(path, advice)
    try:
        images = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[layout["label_key"]], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as err:
        raise SpkpruneError(f"{path} is not a CIFAR python batch file ({_one_line(err)}); {advice}") from None
    return images, labels


def _unpickle_batch(path: Path, advice: str) -> dict:
    try:
        with open(path, "rb") as f:
            entry = load_plain_data(f, encoding="bytes")
    except RefusedGlobal as err:
        raise SpkpruneError(
            f"{path} is not a CIFAR python batch file: it pickles {err}, which the data set never holds "
            f"(refused without running it); {advice}"
        ) from None
    except Exception as err:  # random or truncated bytes raise many types (UnpicklingError, EOFError, ValueError...)
        raise SpkpruneError(
            f"{path} is not a CIFAR python batch file ({type(err).__name__}: {_one_line(err)}); {advice}"
        ) from None
    if not isinstance(entry, dict):
        raise SpkpruneError(f"{path} is not a CIFAR python batch file (it holds a {type(entry).__name__}); {advice}")
    return entry


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


class CifarDataset(Dataset):
    """CIFAR images as uint8 in memory; each item is a normalised float `[3,32,32]` (augmented for training)."""

    def __init__(self, name: str, split: str, data_dir: str | Path | None, augment: bool = False):
        layout = _LAYOUT[name]
        batches = [_read_batch(path, layout) for path in _batch_files(name, split, data_dir)]
        self.images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
        self.targets = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        self.transform = cifar_transform(layout["mean"], layout["std"], augment)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])
