"""The Spike-driven Transformer (V1; Yao et al., NeurIPS 2023), faithful to the original code and checkpoint-compatible.

Module names, parameter shapes and the order of operations follow `BICLab/Spike-Driven-Transformer` (commit 3faa822:
`model/spikeformer.py`, `module/ms_conv.py`, `module/sps.py`), so an original state_dict loads with `strict=True`, in
the original key order. What sets it apart from the Spikformer:

- membrane shortcuts: the residual stream carries BatchNorm outputs (membrane potentials), and every block begins
  with a neuron (`shortcut_lif`, `fc1_lif`, `fc2_lif`) instead of ending with one, so every conv sees spikes only;
- spike-driven self-attention (`attn_mode="direct_xor"`): per head `q * SN(sum over tokens of k * v)`, masks and
  additions only, with `talking_heads_lif` (threshold 0.5) as SN;
- 1x1 `Conv2d` projections on the `[T*B, C, H, W]` maps: tokens are the H x W positions, never flattened to a list;
- the stem (`patch_embed`) max-pools after the stages `pooling_stat` marks ("0011": the last two); the last stage
  pools its BatchNorm output, and the position embedding is added to that membrane potential;
- `dvs_mode`: a 3x3 max-pool ("Erode") over neighbouring positions after k, v, k*v and q*kv;
- logits: mean over tokens, `head_lif`, `head`, mean over time (TET off; the original's TET mode returns per-step
  logits, whose mean over time is what its validation scores, i.e. these logits).

The original also creates `patch_embed.rpe_lif`, `block.i.attn.attn_lif` and `block.i.attn.talking_heads` (a
Conv1d) and never calls them. The two neurons hold no state_dict entries and are left out here; `talking_heads`
is kept (its weight is in every checkpoint) but, as in the original, never used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from spkprune.errors import SpkpruneError
from spkprune.models.inputs import time_major
from spkprune.models.neurons import ATTN_THRESHOLD, LIF, layer_weights, lif_sites
from spkprune.models.spikformer import check_state_dict
from spkprune.models.token_flow import MAPS, batch_norm_kept, mean_over_kept, run_token_blocks, token_mask
from spkprune.models.widths import BLOCK_WIDTHS, STEM_WIDTHS, width_of, width_problems, widths_as_lists

_STAGE_SUFFIXES = ("", "1", "2", "3")
WIDTH_FIELDS = {**BLOCK_WIDTHS, **STEM_WIDTHS}


@dataclass(frozen=True)
class SDTConfig:
    """Everything that decides a Spike-driven Transformer's structure (the original constructor's names in
    brackets): `img_size` (img_size_h = img_size_w), `embed_dim` (embed_dims), `depth` (depths), `timesteps` (T),
    `mlp_ratio` (mlp_ratios), `pooling_stat` (one "0"/"1" per stem stage: max-pool after it or not).

    A compacted model records its widths (`spkprune.models.widths`): `block_heads`, `block_mlp_hidden` and
    `stem_channels` (the first three stem convs); None means the uniform widths of the original."""

    img_size: int
    in_channels: int
    num_classes: int
    embed_dim: int
    num_heads: int
    depth: int
    timesteps: int
    pooling_stat: str = "1111"
    mlp_ratio: float = 4
    dvs_mode: bool = False
    attn_mode: str = "direct_xor"
    spike_mode: str = "lif"
    dataset: str | None = None
    block_heads: tuple[int, ...] | None = None
    block_mlp_hidden: tuple[int, ...] | None = None
    stem_channels: tuple[int, ...] | None = None

    def __post_init__(self):
        problems = []
        if len(self.pooling_stat) != 4 or set(self.pooling_stat) - {"0", "1"}:
            problems.append(f"pooling_stat must be four of '0'/'1', got {self.pooling_stat!r}")
        elif self.img_size % 2**self.num_pools:
            problems.append(f"img_size {self.img_size} must be divisible by 2**{self.num_pools} (pooling_stat)")
        if self.embed_dim % 8 or self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} must be divisible by 8 and by num_heads {self.num_heads}")
        if self.attn_mode != "direct_xor":
            problems.append(f"attn_mode {self.attn_mode!r} is not supported (only 'direct_xor', the original's)")
        if self.spike_mode != "lif":
            problems.append(f"spike_mode {self.spike_mode!r} is not supported (only 'lif')")
        for name in ("img_size", "in_channels", "num_classes", "num_heads", "depth", "timesteps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_hidden < 1:
            problems.append(f"mlp_ratio {self.mlp_ratio} leaves no hidden channels")
        problems += width_problems(self, WIDTH_FIELDS)
        if problems:
            raise SpkpruneError("invalid Spike-driven Transformer configuration: " + "; ".join(problems))

    @property
    def variant(self) -> str:
        """The input the structure was made for, as the other families say it: "dvs" for two-channel event frames,
        "imagenet" for the four-pool stem, "cifar" otherwise (the original has one model file for all)."""
        if self.in_channels == 2:
            return "dvs"
        return "imagenet" if self.num_pools == 4 else "cifar"

    @property
    def num_pools(self) -> int:
        return self.pooling_stat.count("1")

    @property
    def grid_size(self) -> int:
        """Side of the token grid the blocks work on."""
        return self.img_size // 2**self.num_pools

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """The original's hidden width (every block's, unless `block_mlp_hidden` says otherwise)."""
        return int(self.embed_dim * self.mlp_ratio)

    def heads_of(self, block: int) -> int:
        """Attention heads of block `block` (each `head_dim` channels wide)."""
        return width_of(self.block_heads, block, self.num_heads)

    def mlp_hidden_of(self, block: int) -> int:
        """MLP hidden channels of block `block`."""
        return width_of(self.block_mlp_hidden, block, self.mlp_hidden)

    @property
    def stem_widths(self) -> tuple[int, int, int, int]:
        """Output channels of the four stem convs."""
        dim = self.embed_dim
        inner = (dim // 8, dim // 4, dim // 2) if self.stem_channels is None else self.stem_channels
        return (*inner, dim)

    def original_kwargs(self) -> dict:
        """The original `SpikeDrivenTransformer(...)` arguments that build this structure."""
        return dict(
            img_size_h=self.img_size, img_size_w=self.img_size, in_channels=self.in_channels,
            num_classes=self.num_classes, embed_dims=self.embed_dim, num_heads=self.num_heads,
            mlp_ratios=self.mlp_ratio, qkv_bias=False, depths=self.depth, sr_ratios=1, T=self.timesteps,
            pooling_stat=self.pooling_stat, attn_mode=self.attn_mode, spike_mode=self.spike_mode,
            dvs_mode=self.dvs_mode, TET=False,
        )

    def to_dict(self) -> dict:
        return widths_as_lists(dataclasses.asdict(self), WIDTH_FIELDS)

    @classmethod
    def from_dict(cls, data: dict) -> "SDTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpkpruneError(f"unknown Spike-driven Transformer configuration keys: {', '.join(unknown)}")
        return cls(**data)


def _erode() -> nn.Module:
    # The original's `Erode`: on a 5-D tensor, max over a 3x3 window of its last two axes (stride 1, same size).
    return nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 1, 1), padding=(0, 1, 1))


def unflatten_time(x: torch.Tensor, T: int) -> torch.Tensor:
    """`[T*B, ...]` -> `[T, B, ...]`."""
    return x.reshape(T, -1, *x.shape[1:])


class SpikingPatchEmbed(nn.Module):
    """The original `MS_SPS`: four conv-BN-LIF stages (C/8, C/4, C/2, C), a 3x3 stride-2 max-pool after each stage
    `pooling_stat` marks, then the position embedding `rpe_bn(rpe_conv(spikes)) + membrane`. Returns membrane
    potentials `[T, B, C, H', W']`, not spikes."""

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        self.pooled = tuple(flag == "1" for flag in cfg.pooling_stat)
        channels = (cfg.in_channels, *cfg.stem_widths)
        for i, suffix in enumerate(_STAGE_SUFFIXES):
            setattr(self, f"proj_conv{suffix}", nn.Conv2d(channels[i], channels[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(channels[i + 1]))
            setattr(self, f"proj_lif{suffix}", LIF())
            if self.pooled[i]:
                setattr(self, f"maxpool{suffix}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        dim = cfg.embed_dim
        self.rpe_conv = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(dim)

    def _layer(self, kind: str, stage: int) -> nn.Module:
        return getattr(self, f"{kind}{_STAGE_SUFFIXES[stage]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T,B,C,H,W] images -> [T,B,D,H',W'] membrane
        T = x.shape[0]
        x = x.flatten(0, 1)
        for stage in range(3):  # these stages pool spikes
            x = self._layer("proj_bn", stage)(self._layer("proj_conv", stage)(x))
            x = self._layer("proj_lif", stage)(unflatten_time(x, T)).flatten(0, 1)
            if self.pooled[stage]:
                x = self._layer("maxpool", stage)(x)
        membrane = self.proj_bn3(self.proj_conv3(x))
        if self.pooled[3]:  # the last stage pools its membrane potential, before the neuron
            membrane = self.maxpool3(membrane)
        spikes = self.proj_lif3(unflatten_time(membrane, T)).flatten(0, 1)
        return unflatten_time(self.rpe_bn(self.rpe_conv(spikes)) + membrane, T)


class SpikeDrivenSelfAttention(nn.Module):
    """The original `MS_SSA_Conv`: `x + proj_bn(proj_conv(SDSA(shortcut_lif(x))))` on membrane maps `[T,B,C,H,W]`."""

    def __init__(self, cfg: SDTConfig, index: int = 0):
        super().__init__()
        dim, heads = cfg.embed_dim, cfg.heads_of(index)  # a compacted block may keep fewer heads, each as wide
        self.num_heads, self.head_dim = heads, cfg.head_dim
        inner = heads * self.head_dim
        if cfg.dvs_mode:
            self.pool = _erode()
        for prefix in ("q", "k", "v"):
            setattr(self, f"{prefix}_conv", nn.Conv2d(dim, inner, kernel_size=1, stride=1, bias=False))
            setattr(self, f"{prefix}_bn", nn.BatchNorm2d(inner))
            setattr(self, f"{prefix}_lif", LIF())
        # Never called, as in the original; kept because every checkpoint holds its weight.
        self.talking_heads = nn.Conv1d(heads, heads, kernel_size=1, stride=1, bias=False)
        self.talking_heads_lif = LIF(ATTN_THRESHOLD)
        self.proj_conv = nn.Conv2d(inner, dim, kernel_size=1, stride=1)
        self.proj_bn = nn.BatchNorm2d(dim)
        self.shortcut_lif = LIF()

    def _erode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) if hasattr(self, "pool") else x

    def _spikes(self, prefix: str, x: torch.Tensor, T: int, keep: torch.Tensor | None) -> torch.Tensor:
        """`<p>_lif(<p>_bn(<p>_conv(x)))`: `[T*B, C, H, W]` spikes -> `[T, B, C, H, W]` spikes."""
        y = batch_norm_kept(getattr(self, f"{prefix}_bn"), getattr(self, f"{prefix}_conv")(x), keep)
        return getattr(self, f"{prefix}_lif")(unflatten_time(y, T))

    def _heads(self, s: torch.Tensor) -> torch.Tensor:  # [T,B,C,H,W] -> [T,B,heads,N,C/heads]
        T, B, _, H, W = s.shape
        return s.flatten(3).transpose(-1, -2).reshape(T, B, H * W, self.num_heads, self.head_dim).transpose(2, 3)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep` `[B, H*W]`: masked tokens add nothing to the sum over tokens of k * v (token_flow)."""
        T, B, C, H, W = x.shape
        spikes = self.shortcut_lif(x).flatten(0, 1)
        q = self._heads(self._spikes("q", spikes, T, keep))
        k = self._heads(self._erode(self._spikes("k", spikes, T, keep)))
        v = self._heads(self._erode(self._spikes("v", spikes, T, keep)))
        if keep is not None:
            k = k * token_mask(keep, k, axis=3)
        kv = self.talking_heads_lif(self._erode(k * v).sum(dim=-2, keepdim=True))  # [T,B,heads,1,C/heads]
        attended = self._erode(q * kv).transpose(3, 4).reshape(T, B, -1, H, W)  # heads * head_dim channels
        out = batch_norm_kept(self.proj_bn, self.proj_conv(attended.flatten(0, 1)), keep)
        return out.reshape(T, B, C, H, W) + x


class MembraneShortcutMLP(nn.Module):
    """The original `MS_MLP_Conv`: `x + fc2_bn(fc2_conv(fc2_lif(fc1_bn(fc1_conv(fc1_lif(x))))))`; with a hidden
    width equal to the input's, the hidden membrane also takes the shortcut (the original's `res`)."""

    def __init__(self, cfg: SDTConfig, index: int = 0):
        super().__init__()
        dim, hidden = cfg.embed_dim, cfg.mlp_hidden_of(index)
        self.hidden_shortcut = dim == cfg.mlp_hidden  # the original's width decides, not a compacted one
        self.fc1_conv = nn.Conv2d(dim, hidden, kernel_size=1, stride=1)
        self.fc1_bn = nn.BatchNorm2d(hidden)
        self.fc1_lif = LIF()
        self.fc2_conv = nn.Conv2d(hidden, dim, kernel_size=1, stride=1)
        self.fc2_bn = nn.BatchNorm2d(dim)
        self.fc2_lif = LIF()

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # [T,B,C,H,W] membrane
        T = x.shape[0]
        hidden = unflatten_time(batch_norm_kept(self.fc1_bn, self.fc1_conv(self.fc1_lif(x).flatten(0, 1)), keep), T)
        shortcut = x
        if self.hidden_shortcut:
            hidden = shortcut + hidden
            shortcut = hidden
        out = batch_norm_kept(self.fc2_bn, self.fc2_conv(self.fc2_lif(hidden).flatten(0, 1)), keep)
        return unflatten_time(out, T) + shortcut


class Block(nn.Module):
    """The original `MS_Block_Conv`: attention, then MLP, each with its membrane shortcut."""

    def __init__(self, cfg: SDTConfig, index: int = 0):
        super().__init__()
        self.attn = SpikeDrivenSelfAttention(cfg, index)
        self.mlp = MembraneShortcutMLP(cfg, index)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.attn(x, keep), keep)


class SpikeDrivenTransformer(nn.Module):
    """A Spike-driven Transformer (V1). Build it with `spkprune.create_model(name)`.

    Token layout: the blocks pass membrane maps `[T, B, C, H, W]`, whose `num_tokens = H * W` positions (axes 3-4,
    row-major) are the tokens; inside the attention q, k and v are `[T, B, heads, N, C/heads]` (token axis 3).
    """

    def __init__(self, cfg: SDTConfig, preset: str | None = None):
        super().__init__()
        self.config = cfg
        self.preset = preset
        self.patch_embed = SpikingPatchEmbed(cfg)
        self.block = nn.ModuleList(Block(cfg, index) for index in range(cfg.depth))
        self.head_lif = LIF()
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.token_selectors = nn.ModuleDict()  # spkprune.models.selector; its learned MLPs add state_dict entries
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the original: only Conv2d and BatchNorm2d; the head and `talking_heads` keep PyTorch's defaults.
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)  # timm's cut: +-2 absolute
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- what the pruning, counting and selection code needs -------------------------------------------------

    @property
    def name(self) -> str:
        return self.preset or f"sdt-{self.config.depth}-{self.config.embed_dim}"

    @property
    def num_tokens(self) -> int:
        """Tokens (grid positions) entering the first block."""
        return self.config.num_tokens

    @property
    def token_dim(self) -> int:
        return self.config.embed_dim

    def prunable_weights(self) -> dict[str, nn.Parameter]:
        """Conv and linear weights by state_dict key, `talking_heads` excepted (the original never calls it)."""
        return layer_weights(self, unused=("talking_heads",))

    def neuron_sites(self) -> dict[str, LIF]:
        """Every LIF that fires, by its original module path, in module order."""
        return lif_sites(self)

    token_layout = MAPS  # blocks pass `[T, B, C, H, W]` maps whose H*W positions are the tokens

    def token_blocks(self) -> list[tuple[int, nn.Module]]:
        """The blocks that work on the selectors' tokens, by index: all of them."""
        return list(enumerate(self.block))

    def selector_locations(self) -> list[int]:
        """Blocks before which a token selector may sit: every block but the first. The blocks' convs are 1x1 and
        their attention works on the flattened H*W positions, so a selector may gather K of them (a `[.., K, 1]`
        map) or mask them. None with `dvs_mode`, whose 3x3 erode pools neighbouring positions in the attention."""
        return [] if self.config.dvs_mode else list(range(1, self.config.depth))

    @property
    def selector_rule(self) -> str:
        """Why the selector locations are what they are (the refusal of any other location says it)."""
        if self.config.dvs_mode:
            return "dvs_mode's 3x3 erode pools neighbouring grid positions in every attention: it needs the full grid"
        return "block 0 always sees every token"

    def used_parameter_count(self) -> int:
        """Parameters that take part in forward: all but the never-called `talking_heads`."""
        unused = {id(block.attn.talking_heads.weight) for block in self.block}
        return sum(p.numel() for p in self.parameters() if id(p) not in unused)

    # ---- forward ---------------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images `[B,C,H,W]` (repeated over T) or event frames `[B,T,C,H,W]` -> the `[T,B,C,H,W]` sequence."""
        cfg = self.config
        return time_major(x, cfg.in_channels, cfg.img_size, cfg.timesteps, self.name)

    def forward_blocks(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[T,B,C,H,W]` input sequence -> the last block's membrane maps `[T,B,D,H',W']` (`[T,B,D,K,1]` when a
        selector gathered K tokens) and the keep mask the pooling applies (`spkprune.models.token_flow`)."""
        return run_token_blocks(self, self.patch_embed(sequence))

    def forward_features(self, sequence: torch.Tensor) -> torch.Tensor:
        """`[T,B,C,H,W]` input sequence -> the last block's membrane maps (`forward_blocks` without the mask)."""
        return self.forward_blocks(sequence)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `[B, classes]`. Every neuron starts from a zero membrane on every call."""
        maps, keep = self.forward_blocks(self.encode(x))
        pooled = mean_over_kept(maps.flatten(3), keep)  # [T,B,D]: mean over (kept) tokens
        return self.head(self.head_lif(pooled)).mean(0)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


__all__ = ["SDTConfig", "SpikeDrivenTransformer"]
