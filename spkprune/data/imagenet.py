"""ImageNet-1k from a local folder in the usual ImageFolder layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`).

Transforms follow the original Spikformer ImageNet settings (SPIKFORMER.md section 6): RandomResizedCrop with scale
(1, 1), bicubic, horizontal flip, RandAugment (2 ops, magnitude 9), random erasing 0.25; evaluation resizes to 224
with crop_pct 1.0. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torchvision.transforms as T
from torchvision.datasets import ImageFolder

from spkprune.errors import SpkpruneError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_FOLDERS = {"train": "train", "test": "val"}


def imagenet_transform(img_size: int, augment: bool) -> T.Compose:
    bicubic = T.InterpolationMode.BICUBIC
    if not augment:
        return T.Compose([T.Resize(img_size, interpolation=bicubic), T.CenterCrop(img_size), T.ToTensor(),
                          T.Normalize(MEAN, STD)])
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(1.0, 1.0), interpolation=bicubic),
        T.RandomHorizontalFlip(),
        T.RandAugment(num_ops=2, magnitude=9, interpolation=T.InterpolationMode.BILINEAR),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
        T.RandomErasing(p=0.25, value=0),
    ])


def imagenet_dataset(split: str, data_dir: str | Path | None, img_size: int = 224, augment: bool = False) -> ImageFolder:
    layout = "DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (the ImageFolder layout)"
    if data_dir is None:
        raise SpkpruneError(f"imagenet needs --data-dir DIR holding {layout}")
    folder = Path(data_dir).expanduser() / _FOLDERS[split]
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        raise SpkpruneError(f"imagenet not found: {folder} has no class folders; put {layout}")
    return ImageFolder(folder, transform=imagenet_transform(img_size, augment))
