"""The embedded default: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

The train/test split is fixed (stratified, 80/20, seed 0) so that every run and every artifact sees the same test
set. Pixels are scaled to [0, 1] and normalised with the train split's mean and standard deviation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _load_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits  # scikit-learn takes about a second to import; only digits needs it
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    mean = float(images[idx_train].mean())
    std = float(images[idx_train].std())
    normalised = torch.from_numpy((images - mean) / std).unsqueeze(1)  # [N, 1, 8, 8]
    targets = torch.from_numpy(labels)
    return {
        "train": (normalised[idx_train].contiguous(), targets[idx_train].contiguous()),
        "test": (normalised[idx_test].contiguous(), targets[idx_test].contiguous()),
    }


def _shift(image: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate by up to `max_shift` pixels in each direction, filling with the background value."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    background = image.amin()
    padded = torch.nn.functional.pad(image, (max_shift,) * 4, value=float(background))
    h, w = image.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


class DigitsDataset(Dataset):
    """One split of the digits data, held in memory as float tensors `[1, 8, 8]`."""

    def __init__(self, split: str, augment: bool = False):
        self.images, self.targets = _load_split()[split]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment:
            image = _shift(image, 1)
        return image, int(self.targets[index])
