"""Named presets of the Spike-driven Transformer (V1), as data: one per configuration in the original's `conf/`.

Every figure comes from `BICLab/Spike-Driven-Transformer`'s `conf/*.yml` and `train.py`: 8 heads, MLP ratio 4,
`dvs_mode` only for CIFAR10-DVS (train.py sets it for the `cifar10-dvs` data sets alone, not for DVS128 Gesture),
CIFAR10-DVS frames resized to 64x64. `conf/imagenet/10_384_300E_t4.yml` builds a 10-layer model with dim 512 (its
file name says 384): it is the README's 10-512 model and is `sdt-10-512-imagenet` here.

`sdt-2-64-digits` is ours, for the embedded 8x8 one-channel digits: pooling_stat "0001" pools once, after the last
stem stage (on its membrane potential, as the original's last pool does), so the three earlier stages see the full
8x8 image and the blocks work on a 4x4 grid of 16 tokens, room for a token selector between the two blocks.
"""

from __future__ import annotations

from spkprune.models.sdt import SDTConfig


def _cifar(dim: int, classes: int, dataset: str) -> SDTConfig:
    return SDTConfig(32, 3, classes, dim, 8, 2, 4, pooling_stat="0011", dataset=dataset)


def _imagenet(depth: int, dim: int) -> SDTConfig:
    return SDTConfig(224, 3, 1000, dim, 8, depth, 4, pooling_stat="1111", dataset="imagenet")


def _gesture(timesteps: int) -> SDTConfig:
    return SDTConfig(128, 2, 11, 256, 8, 2, timesteps, pooling_stat="0111", dataset="dvs128-gesture")


SDT_PRESETS: dict[str, SDTConfig] = {
    "sdt-2-512-cifar10": _cifar(512, 10, "cifar10"),  # conf/cifar10/2_512_300E_t4.yml
    "sdt-2-256-cifar10": _cifar(256, 10, "cifar10"),  # conf/cifar10/2_256_300E_t4.yml
    "sdt-2-512-cifar100": _cifar(512, 100, "cifar100"),  # conf/cifar100/2_512_300E_t4.yml
    "sdt-2-256-cifar100": _cifar(256, 100, "cifar100"),  # conf/cifar100/2_256_300E_t4.yml
    # conf/cifar10-dvs/2_256_200E_t10_TET.yml (trained with TET; the structure and eval logits are TET-free)
    "sdt-2-256-cifar10dvs": SDTConfig(
        64, 2, 10, 256, 8, 2, 10, pooling_stat="0011", dvs_mode=True, dataset="cifar10-dvs"
    ),
    "sdt-2-256-dvs128": _gesture(16),  # conf/gesture/2_256_200E_t16.yml
    "sdt-2-256-dvs128-t10": _gesture(10),  # conf/gesture/2_256_200E_t10.yml
    "sdt-8-384-imagenet": _imagenet(8, 384),  # conf/imagenet/8_384_300E_t4.yml
    "sdt-6-512-imagenet": _imagenet(6, 512),  # conf/imagenet/6_512_300E_t4.yml
    "sdt-8-512-imagenet": _imagenet(8, 512),  # conf/imagenet/8_512_300E_t4.yml
    "sdt-10-512-imagenet": _imagenet(10, 512),  # conf/imagenet/10_384_300E_t4.yml (dim 512, layer 10)
    "sdt-8-768-imagenet": _imagenet(8, 768),  # conf/imagenet/8_768_300E_t4.yml
    "sdt-2-64-digits": SDTConfig(8, 1, 10, 64, 8, 2, 4, pooling_stat="0001", dataset="digits"),
}


__all__ = ["SDT_PRESETS"]
