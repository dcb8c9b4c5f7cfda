"""Augmentations of the original Spikformer recipes, rebuilt from torchvision.transforms.v2 ops.

- `SNNRandAugment`: Spikformer's `aa_snn.py` policy `rand-m9-n1-mstd0.4-inc1` for CIFAR: one op per image drawn from
  {Equalize, Rotate, ShearX, TranslateXRel, TranslateYRel}, applied with probability 0.5, magnitude 9/10 with a
  Gaussian jitter of std 0.4 and a random sign (timm's conventions: rotate up to 30 degrees, shear up to 0.3,
  translate up to 0.45 of the image).
- `SNNAugmentWide`: the CIFAR10-DVS script's TrivialAugment-style op on event frames `[T, C, H, W]`, the same
  geometric transform for every time step: one of {Identity, ShearX +-0.3, TranslateX/Y +-5 px, Rotate +-30 deg,
  Cutout}.

Both draw from torch's global generator, so a seeded run (and each seeded DataLoader worker) is reproducible.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F

_MAX_MAGNITUDE = 10.0


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high))


def _random_sign(value: float) -> float:
    return value if torch.rand(()) < 0.5 else -value


def _shear_x(img: torch.Tensor, shear: float) -> torch.Tensor:
    # A shear factor s is an angle of atan(s) in torchvision's affine convention.
    return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(shear)), 0.0])


def _translate(img: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    return F.affine(img, angle=0.0, translate=[round(dx), round(dy)], scale=1.0, shear=[0.0, 0.0])


class SNNRandAugment(torch.nn.Module):
    """One op of {Equalize, Rotate, ShearX, TranslateXRel, TranslateYRel} with p=0.5 (uint8 images `[C,H,W]`)."""

    OPS = ("equalize", "rotate", "shear_x", "translate_x", "translate_y")

    def __init__(self, magnitude: float = 9.0, magnitude_std: float = 0.4, prob: float = 0.5):
        super().__init__()
        self.magnitude, self.magnitude_std, self.prob = magnitude, magnitude_std, prob

    def _level(self) -> float:
        m = self.magnitude + float(torch.randn(())) * self.magnitude_std if self.magnitude_std > 0 else self.magnitude
        return min(max(m, 0.0), _MAX_MAGNITUDE) / _MAX_MAGNITUDE

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        op = self.OPS[int(torch.randint(len(self.OPS), ()))]
        if torch.rand(()) >= self.prob:
            return img
        level = self._level()
        h, w = img.shape[-2:]
        if op == "equalize":
            return F.equalize(img)
        if op == "rotate":
            return F.rotate(img, _random_sign(30.0 * level))
        if op == "shear_x":
            return _shear_x(img, _random_sign(0.3 * level))
        if op == "translate_x":
            return _translate(img, _random_sign(0.45 * level) * w, 0.0)
        return _translate(img, 0.0, _random_sign(0.45 * level) * h)


class SNNAugmentWide(torch.nn.Module):
    """One TrivialAugment-style op on event frames `[T, C, H, W]`, identical for all time steps."""

    OPS = ("identity", "shear_x", "translate_x", "translate_y", "rotate", "cutout")

    def __init__(self, shear: float = 0.3, translate_px: float = 5.0, rotate_deg: float = 30.0):
        super().__init__()
        self.shear, self.translate_px, self.rotate_deg = shear, translate_px, rotate_deg
        self.cutout = T.RandomErasing(p=1.0, value=0)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        op = self.OPS[int(torch.randint(len(self.OPS), ()))]
        if op == "identity":
            return frames
        if op == "shear_x":
            return _shear_x(frames, _uniform(-self.shear, self.shear))
        if op == "translate_x":
            return _translate(frames, _uniform(-self.translate_px, self.translate_px), 0.0)
        if op == "translate_y":
            return _translate(frames, 0.0, _uniform(-self.translate_px, self.translate_px))
        if op == "rotate":
            return F.rotate(frames, _uniform(-self.rotate_deg, self.rotate_deg))
        return self.cutout(frames)


def cifar_transform(mean: tuple[float, ...], std: tuple[float, ...], augment: bool) -> T.Compose:
    """uint8 `[3,32,32]` -> normalised float. Training: hflip, SNN RandAugment, random erasing p=0.25 (const)."""
    normalise = [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if not augment:
        return T.Compose(normalise)
    # RandomResizedCrop(scale=(1,1), ratio=(1,1)) of the original recipe is the identity at 32x32, so it is omitted.
    return T.Compose(
        [T.RandomHorizontalFlip(0.5), SNNRandAugment(), *normalise, T.RandomErasing(p=0.25, value=0)]
    )
