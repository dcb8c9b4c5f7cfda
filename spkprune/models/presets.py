"""Named presets of the Spikformer family, as data (like timm's registry)."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

from spkprune.errors import SpkpruneError
from spkprune.models.widths import BLOCK_WIDTHS, STEM_WIDTHS, width_of, width_problems, widths_as_lists

VARIANTS = ("cifar", "dvs", "imagenet")
WIDTH_FIELDS = {**BLOCK_WIDTHS, **STEM_WIDTHS}  # field -> length (None: depth)


@dataclass(frozen=True)
class SpikformerConfig:
    """Everything that decides a model's structure.

    `variant` picks the original code base: `cifar` (Linear + BatchNorm1d projections with bias), `dvs`
    (Conv1d projections, event-frame input) or `imagenet` (Conv1d attention, 1x1 Conv2d MLP).
    `num_pools` max-pools sit after the last stages of the patch splitting (2 for CIFAR, 4 for DVS/ImageNet).

    A compacted model (`spkprune compact`) records its own widths: `block_heads` (attention heads per block, each
    head keeping the width embed_dim / num_heads), `block_mlp_hidden` (MLP hidden channels per block) and
    `stem_channels` (the outputs of the first three patch-splitting convs). None means the uniform widths of the
    original: num_heads, embed_dim * mlp_ratio and (C/8, C/4, C/2).
    """

    variant: str
    img_size: int
    in_channels: int
    num_classes: int
    embed_dim: int
    num_heads: int
    depth: int
    timesteps: int
    num_pools: int
    attn_scale: float
    mlp_ratio: int = 4
    ln_eps: float = 1e-5
    dataset: str | None = None
    block_heads: tuple[int, ...] | None = None
    block_mlp_hidden: tuple[int, ...] | None = None
    stem_channels: tuple[int, ...] | None = None
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.embed_dim % 8 or self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} must be divisible by 8 and by num_heads {self.num_heads}")
        if not 0 <= self.num_pools <= 4:
            problems.append(f"num_pools must be in 0..4, got {self.num_pools}")
        if self.img_size % (2**self.num_pools):
            problems.append(f"img_size {self.img_size} must be divisible by 2**num_pools = {2 ** self.num_pools}")
        for name in ("depth", "timesteps", "num_classes", "in_channels", "mlp_ratio"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        problems += width_problems(self, WIDTH_FIELDS)
        if problems:
            raise SpkpruneError("invalid model configuration: " + "; ".join(problems))

    def heads_of(self, block: int) -> int:
        """Attention heads of block `block`."""
        return width_of(self.block_heads, block, self.num_heads)

    @property
    def head_dim(self) -> int:
        """Channels per attention head: embed_dim / num_heads, whatever heads a block keeps."""
        return self.embed_dim // self.num_heads

    def mlp_hidden_of(self, block: int) -> int:
        """MLP hidden channels of block `block`."""
        return width_of(self.block_mlp_hidden, block, self.embed_dim * self.mlp_ratio)

    @property
    def stem_widths(self) -> tuple[int, int, int]:
        """Output channels of the first three patch-splitting convs (the fourth gives embed_dim)."""
        dim = self.embed_dim
        return (dim // 8, dim // 4, dim // 2) if self.stem_channels is None else tuple(self.stem_channels)

    @property
    def is_uniform(self) -> bool:
        """True when every block has the original widths (no compaction recorded)."""
        return all(getattr(self, name) is None for name in WIDTH_FIELDS)

    @property
    def grid_size(self) -> int:
        return self.img_size // 2**self.num_pools

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("extras")
        return widths_as_lists(data, WIDTH_FIELDS)

    @classmethod
    def from_dict(cls, data: dict) -> "SpikformerConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpkpruneError(f"unknown model configuration keys: {', '.join(unknown)}")
        return cls(**data)


def _cifar(depth, dim, heads, classes, dataset):
    return SpikformerConfig("cifar", 32, 3, classes, dim, heads, depth, 4, 2, 0.125, dataset=dataset)


def _dvs(classes, dataset, depth=2):
    return SpikformerConfig("dvs", 128, 2, classes, 256, 16, depth, 16, 4, 0.25, ln_eps=1e-6, dataset=dataset)


def _imagenet(dim, heads):
    return SpikformerConfig("imagenet", 224, 3, 1000, dim, heads, 8, 4, 4, 0.125, ln_eps=1e-6, dataset="imagenet")


def _digits(depth):
    # 8x8 grey digits, one max-pool -> 4x4 = 16 tokens: the smallest model that has room for a token selector.
    return SpikformerConfig("cifar", 8, 1, 10, 64, 4, depth, 4, 1, 0.125, dataset="digits")


PRESETS: dict[str, SpikformerConfig] = {
    "spikformer-4-384-cifar10": _cifar(4, 384, 12, 10, "cifar10"),
    "spikformer-4-384-cifar100": _cifar(4, 384, 12, 100, "cifar100"),
    "spikformer-4-256-cifar10": _cifar(4, 256, 8, 10, "cifar10"),
    "spikformer-4-256-cifar100": _cifar(4, 256, 8, 100, "cifar100"),
    "spikformer-2-384-cifar10": _cifar(2, 384, 12, 10, "cifar10"),
    "spikformer-2-384-cifar100": _cifar(2, 384, 12, 100, "cifar100"),
    "spikformer-4-512-cifar10": _cifar(4, 512, 16, 10, "cifar10"),
    "spikformer-2-256-cifar10dvs": _dvs(10, "cifar10-dvs"),
    "spikformer-2-256-dvs128": _dvs(11, "dvs128-gesture"),
    # SparseSpikformer's DVS models (its code: depth 4, dim 256, 16 heads, T=16), not the published Spikformer-2-256.
    "spikformer-4-256-cifar10dvs": _dvs(10, "cifar10-dvs", depth=4),
    "spikformer-4-256-dvs128": _dvs(11, "dvs128-gesture", depth=4),
    "spikformer-8-384-imagenet": _imagenet(384, 12),
    "spikformer-8-512-imagenet": _imagenet(512, 8),
    "spikformer-8-768-imagenet": _imagenet(768, 12),
    "spikformer-2-64-digits": _digits(2),
    "spikformer-4-64-digits": _digits(4),
}

DEFAULT_DIGITS_PRESET = "spikformer-2-64-digits"


def list_models(pattern: str | None = None) -> list[str]:
    """Preset names, optionally filtered by a glob pattern (`*cifar*`)."""

    names = sorted(PRESETS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_config(name: str, **overrides) -> SpikformerConfig:
    """The configuration of preset `name`, with fields replaced by `overrides` (e.g. `timesteps=2`)."""
    if name not in PRESETS:
        close = [n for n in PRESETS if name.split("-")[-1] in n] or list(PRESETS)
        raise SpkpruneError(f"unknown preset {name!r}; known presets: {', '.join(sorted(close))}")
    base = PRESETS[name]
    known = {f.name for f in dataclasses.fields(SpikformerConfig)} - {"extras"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SpkpruneError(f"unknown option(s) for preset {name}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dataclasses.replace(base, **overrides)
