"""QKFormer's configuration and the structure tables of the original's three model files (`qkformer.py` builds the
model from them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from spkprune.errors import SpkpruneError
from spkprune.models.widths import BLOCK_WIDTHS, width_of, width_problems, widths_as_lists

VARIANTS = ("cifar", "dvs", "imagenet")


class ConvUnit(NamedTuple):
    """One `<prefix>_conv` (3x3) -> `<prefix>_bn` -> optional max-pool -> `<prefix>_lif` of a patch embedding."""

    prefix: str
    width_divisor: int  # output channels = stage width // width_divisor
    pool: str | None  # attribute name of the 3x3 stride-2 max-pool between BatchNorm and neuron, if any


class EmbedSpec(NamedTuple):
    units: tuple[ConvUnit, ...]
    shortcut_from: int | None  # the unit whose spikes feed `proj_res_conv`; None: the embedding's input
    shortcut_stride: int


FIRST_EMBED = {  # the original's `PatchEmbedInit`
    "cifar": EmbedSpec((ConvUnit("proj", 2, None), ConvUnit("proj1", 1, None)), shortcut_from=0, shortcut_stride=1),
    "dvs": EmbedSpec(
        (ConvUnit("proj", 8, None), ConvUnit("proj1", 4, "maxpool1"), ConvUnit("proj2", 2, "maxpool2"),
         ConvUnit("proj3", 1, "maxpool3")),
        shortcut_from=1, shortcut_stride=4,
    ),
    "imagenet": EmbedSpec(
        (ConvUnit("proj", 2, "proj_maxpool"), ConvUnit("proj1", 1, "proj1_maxpool"), ConvUnit("proj2", 1, None)),
        shortcut_from=0, shortcut_stride=2,
    ),
}
NEXT_EMBED = {  # the original's `PatchEmbeddingStage`: halves the grid, doubles the width
    "cifar": EmbedSpec((ConvUnit("proj3", 1, None), ConvUnit("proj4", 1, "proj4_maxpool")), None, 2),
    "dvs": EmbedSpec((ConvUnit("proj", 1, None), ConvUnit("proj4", 1, "proj4_maxpool")), None, 2),
    "imagenet": EmbedSpec((ConvUnit("proj3", 1, "proj3_maxpool"), ConvUnit("proj4", 1, None)), None, 2),
}
FIRST_EMBED_SHRINK = {"cifar": 1, "dvs": 8, "imagenet": 4}


@dataclass(frozen=True)
class QKFormerConfig:
    """Everything that decides a QKFormer's structure (the original constructor's names in brackets): `img_size`
    (img_size_h = img_size_w), `embed_dim` (embed_dims: the last stage's width), `depth` (depths: blocks in all
    stages; the DVS model always has 2), `timesteps` (T), `mlp_ratio` (mlp_ratios), `variant` (which original model
    file). The CIFAR and DVS files hard-code 8 and 16 heads; other `num_heads` there are ours.

    A compacted model records its widths per block, counted over all stages in forward order
    (`spkprune.models.widths`): `block_heads` (each head keeping its stage's width stage_dim / num_heads) and
    `block_mlp_hidden`, and `stem_channels`, the outputs of the inner units of every patch embedding (each unit but
    the last, embeddings in order: `embed_units`); None means the uniform widths of the original."""

    img_size: int
    in_channels: int
    num_classes: int
    embed_dim: int
    num_heads: int
    depth: int
    timesteps: int
    mlp_ratio: float = 4
    variant: str = "cifar"
    dataset: str | None = None
    block_heads: tuple[int, ...] | None = None
    block_mlp_hidden: tuple[int, ...] | None = None
    stem_channels: tuple[int, ...] | None = None

    def __post_init__(self):
        fields = ("img_size", "in_channels", "num_classes", "embed_dim", "num_heads", "depth", "timesteps")
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in fields if getattr(self, name) < 1]
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        problems = problems or self._structure_problems()  # the structure's arithmetic needs sane numbers
        problems += width_problems(self, BLOCK_WIDTHS)
        if not problems:
            problems += width_problems(self, {"stem_channels": sum(len(units) - 1 for units in self._unit_widths())})
        if problems:
            raise SpkpruneError("invalid QKFormer configuration: " + "; ".join(problems))

    def _structure_problems(self) -> list[str]:
        problems = []
        if min(self.stage_depths) < 0 or sum(self.stage_depths) != self.depth:  # the DVS model is always 1 + 1
            problems.append(f"depth {self.depth} does not fit the {self.variant} stages ({self.stage_depths} blocks)")
        shrink = FIRST_EMBED_SHRINK[self.variant] * 2 ** (len(self.stage_dims) - 1)  # image side / last grid side
        if self.img_size % shrink:
            problems.append(f"img_size {self.img_size} must be divisible by {shrink} ({self.variant})")
        narrowest = 2 ** (len(self.stage_dims) - 1) * max(u.width_divisor for u in FIRST_EMBED[self.variant].units)
        if self.embed_dim % narrowest:
            problems.append(f"embed_dim {self.embed_dim} must be divisible by {narrowest} (its narrowest stem conv)")
        heads = self.num_heads
        problems += [f"stage width {d} is not divisible by num_heads {heads}" for d in self.stage_dims if d % heads]
        if min(self.mlp_hidden) < 1:
            problems.append(f"mlp_ratio {self.mlp_ratio} leaves no hidden channels")
        return problems

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of each stage: (C/4, C/2, C), or (C/2, C) for the DVS model."""
        stages = 2 if self.variant == "dvs" else 3
        return tuple(self.embed_dim // 2 ** (stages - 1 - i) for i in range(stages))

    @property
    def stage_depths(self) -> tuple[int, ...]:
        """Blocks in each stage; all but the last stage use Q-K token attention."""
        return {"cifar": (1, 1, self.depth - 2), "dvs": (1, 1), "imagenet": (1, 2, self.depth - 3)}[self.variant]

    @property
    def stage_grids(self) -> tuple[int, ...]:
        """Side of each stage's token grid."""
        first = self.img_size // FIRST_EMBED_SHRINK[self.variant]
        return tuple(first // 2**i for i in range(len(self.stage_dims)))

    @property
    def stage_tokens(self) -> tuple[int, ...]:
        """Tokens (grid positions) of each stage."""
        return tuple(side**2 for side in self.stage_grids)

    @property
    def mlp_hidden(self) -> tuple[int, ...]:
        return tuple(int(dim * self.mlp_ratio) for dim in self.stage_dims)

    def _unit_widths(self) -> list[list[int]]:
        """The original output channels of every unit of every patch embedding, embeddings in order."""
        specs = [FIRST_EMBED[self.variant]] + [NEXT_EMBED[self.variant]] * (len(self.stage_dims) - 1)
        return [[dim // unit.width_divisor for unit in spec.units] for spec, dim in zip(specs, self.stage_dims)]

    def embed_units(self) -> list[tuple[int, ...]]:
        """Output channels of every unit of every patch embedding (the last unit's is the stage width), with the
        inner units' widths from `stem_channels` where a compacted model records them."""
        widths = self._unit_widths()
        inner = iter(self.stem_channels) if self.stem_channels is not None else None
        return [tuple(next(inner) if inner is not None and i < len(units) - 1 else width
                      for i, width in enumerate(units)) for units in widths]

    def stage_of(self, block: int) -> int:
        """The stage of block `block` (blocks counted over all stages in forward order)."""
        ends = [sum(self.stage_depths[: i + 1]) for i in range(len(self.stage_depths))]
        return next(stage for stage, end in enumerate(ends) if block < end)

    def heads_of(self, block: int) -> int:
        """Attention heads of block `block`."""
        return width_of(self.block_heads, block, self.num_heads)

    def head_dim_of(self, block: int) -> int:
        """Channels per head in block `block`: its stage's width / num_heads, whatever heads the block keeps."""
        return self.stage_dims[self.stage_of(block)] // self.num_heads

    def mlp_hidden_of(self, block: int) -> int:
        """MLP hidden channels of block `block`."""
        return width_of(self.block_mlp_hidden, block, self.mlp_hidden[self.stage_of(block)])

    def to_dict(self) -> dict:
        return widths_as_lists(dataclasses.asdict(self), {**BLOCK_WIDTHS, "stem_channels": None})

    @classmethod
    def from_dict(cls, data: dict) -> "QKFormerConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SpkpruneError(f"unknown QKFormer configuration keys: {', '.join(unknown)}")
        return cls(**data)
