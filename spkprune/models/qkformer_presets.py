"""Named presets of QKFormer, as data: the configurations the original repository trains and logs.

Every figure comes from `zhouchenlin2096/QKFormer` (commit c2a00e8):

- CIFAR-10 / CIFAR-100: `cifar10/cifar10.yml`, `cifar100/cifar100.yml` (layer 4, dim 384, 8 heads, MLP ratio 4,
  time_step 4, 32x32); the CIFAR-10 training log counts 6,706,234 parameters.
- CIFAR10-DVS / DVS128 Gesture: the `QKFormer()` functions of `cifar10-dvs/model.py` and `dvs128-gesture/model.py`
  (dim 256, 16 heads, MLP ratio 1 for CIFAR10-DVS and 4 for the gestures, 2 input channels) and their `train.py`
  (T = 16 frames, spikingjelly's 128x128 frames, no resize).
- ImageNet: `imagenet/qkformer.py`'s `QKFormer_10_384/512/768` (6, 8, 12 heads), which `imagenet/logs/QKFormer_16M,
  29M, 64M.txt` train with time_step 4 on 224x224 crops (16.47 M, 29.08 M, 64.96 M parameters there). The README's
  288x288 and 384x384 results use the 10-768 model: `create_model("qkformer-10-768-imagenet", img_size=384)`.

`qkformer-3-64-digits` is ours, for the embedded 8x8 one-channel digits: the CIFAR structure (whose first patch
embedding keeps the image size) on 8x8 images, so its stages see 8x8, 4x4 and 2x2 token grids of widths 16, 32, 64,
one block each.
"""

from __future__ import annotations

from spkprune.models.qkformer import QKFormerConfig


def _cifar(classes: int, dataset: str) -> QKFormerConfig:
    return QKFormerConfig(32, 3, classes, 384, 8, 4, 4, mlp_ratio=4, variant="cifar", dataset=dataset)


def _dvs(classes: int, mlp_ratio: float, dataset: str) -> QKFormerConfig:
    return QKFormerConfig(128, 2, classes, 256, 16, 2, 16, mlp_ratio=mlp_ratio, variant="dvs", dataset=dataset)


def _imagenet(dim: int, heads: int) -> QKFormerConfig:
    return QKFormerConfig(224, 3, 1000, dim, heads, 10, 4, mlp_ratio=4, variant="imagenet", dataset="imagenet")


QKFORMER_PRESETS: dict[str, QKFormerConfig] = {
    "qkformer-4-384-cifar10": _cifar(10, "cifar10"),  # cifar10/cifar10.yml
    "qkformer-4-384-cifar100": _cifar(100, "cifar100"),  # cifar100/cifar100.yml
    "qkformer-2-256-cifar10dvs": _dvs(10, 1, "cifar10-dvs"),  # cifar10-dvs/model.py QKFormer(), train.py
    "qkformer-2-256-dvs128": _dvs(11, 4, "dvs128-gesture"),  # dvs128-gesture/model.py QKFormer(), train.py
    "qkformer-10-384-imagenet": _imagenet(384, 6),  # QKFormer_10_384, logs/QKFormer_16M.txt
    "qkformer-10-512-imagenet": _imagenet(512, 8),  # QKFormer_10_512, logs/QKFormer_29M.txt
    "qkformer-10-768-imagenet": _imagenet(768, 12),  # QKFormer_10_768, logs/QKFormer_64M.txt
    "qkformer-3-64-digits": QKFormerConfig(8, 1, 10, 64, 8, 3, 4, mlp_ratio=4, variant="cifar", dataset="digits"),
}

# The original constructor each variant follows: file and class.
ORIGINAL_CONSTRUCTORS = {
    "cifar": "cifar10/model.py: spiking_transformer",
    "dvs": "cifar10-dvs/model.py: vit_snn",
    "imagenet": "imagenet/qkformer.py: hierarchical_spiking_transformer",
}


def original_kwargs(cfg: QKFormerConfig) -> dict:
    """The arguments of the original constructor (`ORIGINAL_CONSTRUCTORS[cfg.variant]`) that build `cfg`'s structure.
    The CIFAR and DVS constructors ignore `num_heads` (they hard-code 8 and 16) and the DVS one `depths` (its
    `QKFormer()` passes 4); `patch_size` is read by none of them."""
    return dict(
        img_size_h=cfg.img_size, img_size_w=cfg.img_size, patch_size=4 if cfg.variant == "cifar" else 16,
        in_channels=cfg.in_channels, num_classes=cfg.num_classes, embed_dims=cfg.embed_dim, num_heads=cfg.num_heads,
        mlp_ratios=cfg.mlp_ratio, qkv_bias=False, depths=4 if cfg.variant == "dvs" else cfg.depth, sr_ratios=1,
        T=cfg.timesteps,
    )


__all__ = ["ORIGINAL_CONSTRUCTORS", "QKFORMER_PRESETS", "original_kwargs"]
