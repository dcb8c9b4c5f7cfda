"""QKFormer (Zhou et al., NeurIPS 2024), faithful to the original code and checkpoint-compatible.

Module names, parameter shapes and the order of operations follow `zhouchenlin2096/QKFormer` (commit c2a00e8). Its
three model files differ in more than size; `QKFormerConfig.variant` names the one followed:

- `"cifar"`: `cifar10/model.py` (= `cifar100/model.py`): stages of widths C/4, C/2, C with 1, 1, `depth - 2`
  blocks; the first patch embedding keeps the image size, the next two halve it.
- `"dvs"`: `cifar10-dvs/model.py` (= `dvs128-gesture/model.py`): stages of widths C/2, C with one block each (the
  original ignores `depths`); the first patch embedding shrinks the frames 8 times.
- `"imagenet"`: `imagenet/qkformer.py`: widths C/4, C/2, C with 1, 2, `depth - 3` blocks; the first patch embedding
  shrinks the image 4 times; `fc1`/`fc2` and `attn` where the other files say `mlp1`/`mlp2` and `ssa`.

The early stages use Q-K token attention (`tssa`); the last uses Spikformer's self-attention (`ssa`). Attention and
MLP end with a neuron, so the residual stream carries sums of spikes; each patch embedding adds a 1x1-conv shortcut
branch ("deformed shortcut") to its main branch, both ending in neurons.

Reproduced on purpose: the last stage's `proj_lif` gets `[T*B, C, N]` and so runs over T*B "time steps" (t0 b0, t0 b1,
..., t1 b0, ...): its membrane carries from sample to sample, so (as in the original) a sample's logits depend on
the rest of the batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from spkprune.models.inputs import time_major
from spkprune.models.neurons import ATTN_THRESHOLD, LIF, layer_weights, lif_sites
from spkprune.models.qkformer_config import FIRST_EMBED, NEXT_EMBED, ConvUnit, EmbedSpec, QKFormerConfig
from spkprune.models.sdt import unflatten_time
from spkprune.models.spikformer import check_state_dict
from spkprune.models.token_flow import MAPS, batch_norm_kept, mean_over_kept, run_token_blocks, token_mask

SSA_SCALE = 0.125  # the original's fixed scale, whatever the head width


class SpikingPatchEmbed(nn.Module):
    """The original `PatchEmbedInit` / `PatchEmbeddingStage`: a main branch of conv-BN-(max-pool)-LIF units plus a
    shortcut branch `proj_res_lif(proj_res_bn(proj_res_conv(s)))`, where s is the spikes of one main unit (or the
    input); returns the sum of the two branches' spikes, `[T, B, width, H', W']`. `units` gives each unit's output
    channels (the last one's is `width`)."""

    def __init__(self, spec: EmbedSpec, in_channels: int, width: int, units: tuple[int, ...] | None = None):
        super().__init__()
        self.spec = spec
        units = units or tuple(width // unit.width_divisor for unit in spec.units)
        channels = in_channels
        for unit, out in zip(spec.units, units):
            setattr(self, f"{unit.prefix}_conv", nn.Conv2d(channels, out, 3, 1, 1, bias=False))
            setattr(self, f"{unit.prefix}_bn", nn.BatchNorm2d(out))
            if unit.pool:
                setattr(self, unit.pool, nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            setattr(self, f"{unit.prefix}_lif", LIF())
            channels = out
        tapped = in_channels if spec.shortcut_from is None else units[spec.shortcut_from]
        self.proj_res_conv = nn.Conv2d(tapped, width, 1, spec.shortcut_stride, 0, bias=False)
        self.proj_res_bn = nn.BatchNorm2d(width)
        self.proj_res_lif = LIF()

    def _unit(self, unit: ConvUnit, x: torch.Tensor, T: int) -> torch.Tensor:  # [T*B,C,H,W] -> [T,B,C',H',W']
        x = getattr(self, f"{unit.prefix}_bn")(getattr(self, f"{unit.prefix}_conv")(x))
        if unit.pool:
            x = getattr(self, unit.pool)(x)
        return getattr(self, f"{unit.prefix}_lif")(unflatten_time(x, T))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, x = x.shape[0], x.flatten(0, 1)
        tapped = x
        for i, unit in enumerate(self.spec.units):
            spikes = self._unit(unit, x, T)
            x = spikes.flatten(0, 1)
            if i == self.spec.shortcut_from:
                tapped = x
        shortcut = self.proj_res_bn(self.proj_res_conv(tapped))
        return spikes + self.proj_res_lif(unflatten_time(shortcut, T))


class _Attention(nn.Module):
    """Both attentions' layers in the original's order: per projection p `<p>_conv` (Conv1d, no bias), `<p>_bn`
    (BatchNorm1d), `<p>_lif`; `attn_lif` (threshold 0.5); `proj_conv` (with bias), `proj_bn`, `proj_lif`."""

    def __init__(self, dim: int, num_heads: int, projections: tuple[str, ...], head_dim: int | None = None):
        super().__init__()
        # a compacted block may keep fewer heads than dim / head_dim, each as wide as the original's
        self.num_heads, self.head_dim = num_heads, head_dim or dim // num_heads
        inner = num_heads * self.head_dim
        for prefix in projections:
            setattr(self, f"{prefix}_conv", nn.Conv1d(dim, inner, kernel_size=1, stride=1, bias=False))
            setattr(self, f"{prefix}_bn", nn.BatchNorm1d(inner))
            setattr(self, f"{prefix}_lif", LIF())
        self.attn_lif = LIF(ATTN_THRESHOLD)
        self.proj_conv = nn.Conv1d(inner, dim, kernel_size=1, stride=1)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = LIF()

    def _spikes(self, prefix: str, tokens: torch.Tensor, T: int, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`[T*B,C,N]` -> `[T,B,C,N]` spikes; BatchNorm statistics from the kept tokens only (token_flow)."""
        y = batch_norm_kept(getattr(self, f"{prefix}_bn"), getattr(self, f"{prefix}_conv")(tokens), keep)
        return getattr(self, f"{prefix}_lif")(unflatten_time(y, T))


class TokenQKAttention(_Attention):
    """The original `Token_QK_Attention` (`tssa`): per head, `attn_lif(sum over the head's channels of q)` is one
    spike per token that masks the token's k; then the output projection. Nothing mixes tokens. Returns spikes."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None):
        super().__init__(dim, num_heads, ("q", "k"), head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, H, W = x.shape
        tokens = x.flatten(3).flatten(0, 1)
        by_head = (T, B, self.num_heads, self.head_dim, H * W)
        q, k = (self._spikes(prefix, tokens, T).reshape(by_head) for prefix in ("q", "k"))
        token_mask = self.attn_lif(q.sum(dim=3, keepdim=True))  # [T,B,heads,1,N]
        masked = (token_mask * k).flatten(2, 3)
        return self.proj_lif(self.proj_bn(self.proj_conv(masked.flatten(0, 1))).reshape(T, B, C, H, W))


class SpikingSelfAttention(_Attention):
    """The original `Spiking_Self_Attention` (`ssa`; `attn` in the ImageNet file): per head `attn_lif((q @ (k^T @ v))
    * 0.125)`, then the output projection, whose neuron runs over `[T*B, C, N]` (module docstring). Returns spikes."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None):
        super().__init__(dim, num_heads, ("q", "k", "v"), head_dim)

    def _heads(self, s: torch.Tensor) -> torch.Tensor:  # [T,B,C,N] -> [T,B,heads,N,C/heads]
        T, B, _, N = s.shape
        return s.transpose(-1, -2).reshape(T, B, N, self.num_heads, self.head_dim).permute(0, 1, 3, 2, 4)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep` `[B, H*W]`: masked tokens are neither keys nor values (token_flow)."""
        T, B, C, H, W = x.shape
        tokens = x.flatten(3).flatten(0, 1)
        q, k, v = (self._heads(self._spikes(p, tokens, T, keep)) for p in ("q", "k", "v"))
        if keep is not None:
            mask = token_mask(keep, k, axis=3)
            k, v = k * mask, v * mask
        attended = (q @ (k.transpose(-2, -1) @ v)) * SSA_SCALE  # sums of spikes: exact in float32
        spikes = self.attn_lif(attended.transpose(3, 4).reshape(T, B, -1, H * W))  # heads * head_dim channels
        projected = batch_norm_kept(self.proj_bn, self.proj_conv(spikes.flatten(0, 1)), keep)
        return self.proj_lif(projected).reshape(T, B, C, H, W)  # neuron over T*B "steps"


class MLP(nn.Module):
    """The original `MLP`: two 1x1 Conv2d-BN-LIF layers, named `mlp1`/`mlp2` (`fc1`/`fc2` in the ImageNet file)."""

    def __init__(self, dim: int, hidden: int, names: tuple[str, str]):
        super().__init__()
        self.names = names
        for name, (cin, cout) in zip(names, ((dim, hidden), (hidden, dim))):
            setattr(self, f"{name}_conv", nn.Conv2d(cin, cout, kernel_size=1, stride=1))
            setattr(self, f"{name}_bn", nn.BatchNorm2d(cout))
            setattr(self, f"{name}_lif", LIF())

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:  # -> spikes [T,B,C,H,W]
        T = x.shape[0]
        for name in self.names:
            y = batch_norm_kept(getattr(self, f"{name}_bn"), getattr(self, f"{name}_conv")(x.flatten(0, 1)), keep)
            x = getattr(self, f"{name}_lif")(unflatten_time(y, T))
        return x


class Block(nn.Module):
    """`x + attention(x)`, then `x + mlp(x)`; the attention sits under the original's name (`tssa`, `ssa`, `attn`)."""

    def __init__(self, attention_name: str, attention: nn.Module, mlp: MLP):
        super().__init__()
        self.attention_name = attention_name
        setattr(self, attention_name, attention)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """`keep` `[B, H*W]` only in the last stage, where token selectors may sit (`tssa` takes none)."""
        attention = getattr(self, self.attention_name)
        x = x + (attention(x) if keep is None else attention(x, keep))
        return x + self.mlp(x, keep)


class QKFormer(nn.Module):
    """A QKFormer. Build it with `spkprune.create_model(name)`.

    Token layout: stage i works on spike-sum maps `[T, B, stage_dims[i], g, g]` with g = `stage_grids[i]`, whose
    g*g positions (axes 3-4, row-major) are its tokens; inside the attention they are flattened to `[T*B, C, N]`.
    """

    def __init__(self, cfg: QKFormerConfig, preset: str | None = None):
        super().__init__()
        self.config = cfg
        self.preset = preset
        units = cfg.embed_units()
        embeds = [SpikingPatchEmbed(FIRST_EMBED[cfg.variant], cfg.in_channels, cfg.stage_dims[0], units[0])]
        later = zip(cfg.stage_dims[1:], units[1:])
        embeds += [SpikingPatchEmbed(NEXT_EMBED[cfg.variant], d // 2, d, widths) for d, widths in later]
        stages = [nn.ModuleList(self._blocks(cfg, i)) for i in range(len(cfg.stage_dims))]
        embed_names = [(f"patch_embed{i}", embed) for i, embed in enumerate(embeds, 1)]
        stage_names = [(f"stage{i}", blocks) for i, blocks in enumerate(stages, 1)]
        if cfg.variant == "dvs":  # its file registers (and so orders the state_dict) stage by stage
            order = [item for pair in zip(embed_names, stage_names) for item in pair]
        else:
            order = embed_names + stage_names
        for name, module in order:
            self.add_module(name, module)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.token_selectors = nn.ModuleDict()  # spkprune.models.selector; its learned MLPs add state_dict entries
        self.apply(self._init_weights)

    @staticmethod
    def _blocks(cfg: QKFormerConfig, stage: int) -> list[Block]:
        dim, first = cfg.stage_dims[stage], sum(cfg.stage_depths[:stage])
        mlp_names = ("fc1", "fc2") if cfg.variant == "imagenet" else ("mlp1", "mlp2")
        last = stage == len(cfg.stage_dims) - 1
        name = ("attn" if cfg.variant == "imagenet" else "ssa") if last else "tssa"
        attention = SpikingSelfAttention if last else TokenQKAttention
        return [
            Block(name, attention(dim, cfg.heads_of(b), cfg.head_dim_of(b)), MLP(dim, cfg.mlp_hidden_of(b), mlp_names))
            for b in range(first, first + cfg.stage_depths[stage])
        ]

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # As the original: only the Linear head; convolutions and BatchNorms keep PyTorch's defaults.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)  # timm's cut: +-2 absolute
            nn.init.zeros_(m.bias)

    # ---- what the pruning, counting and selection code needs -------------------------------------------------

    @property
    def name(self) -> str:
        return self.preset or f"qkformer-{self.config.depth}-{self.config.embed_dim}"

    def stages(self) -> list[tuple[SpikingPatchEmbed, nn.ModuleList]]:
        """Each stage's patch embedding and blocks, in forward order."""
        numbers = range(1, len(self.config.stage_dims) + 1)
        return [(getattr(self, f"patch_embed{i}"), getattr(self, f"stage{i}")) for i in numbers]

    @property
    def stage_tokens(self) -> tuple[int, ...]:
        """Tokens (grid positions) of each stage."""
        return self.config.stage_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens of the last stage, the ones the classifier averages (`stage_tokens` gives every stage's)."""
        return self.config.stage_tokens[-1]

    @property
    def token_dim(self) -> int:
        return self.config.embed_dim

    def prunable_weights(self) -> dict[str, nn.Parameter]:
        """Conv (1-D and 2-D) and linear weights by state_dict key (all take part in forward); no selector weights."""
        return layer_weights(self)

    def neuron_sites(self) -> dict[str, LIF]:
        """Every LIF, by its original module path, in module order."""
        return lif_sites(self)

    token_layout = MAPS  # blocks pass `[T, B, C, g, g]` maps whose g*g positions are the tokens

    def token_blocks(self) -> list[tuple[int, nn.Module]]:
        """The blocks that work on the selectors' tokens, by index (numbered across stages): the last stage's."""
        return list(enumerate(self.stages()[-1][1], sum(self.config.stage_depths[:-1])))

    def block_tokens(self) -> list[int]:
        """Tokens each block sees in the dense model (its stage's grid positions), blocks numbered across stages."""
        cfg = self.config
        return [tokens for tokens, depth in zip(cfg.stage_tokens, cfg.stage_depths) for _ in range(depth)]

    def selector_locations(self) -> list[int]:
        """Blocks before which a token selector may sit: only those of the last stage (after the last patch
        embedding), blocks numbered across stages; never block 0. The 3x3 convs of the patch embeddings between
        stages need the full token grid, so no token may be gathered or masked before the last one."""
        first = sum(self.config.stage_depths[:-1])
        return [block for block in range(first, self.config.depth) if block > 0]

    @property
    def selector_rule(self) -> str:
        first, depth = sum(self.config.stage_depths[:-1]), self.config.depth
        blocks = f"blocks {first}..{depth - 1}" if first < depth else "which has no block here"
        return (f"selectors sit only in the last stage ({blocks}), after the last patch embedding: the 3x3 "
                "patch-embedding convs between stages need the full token grid")

    def used_parameter_count(self) -> int:
        """All parameters: the original creates none that forward leaves unused."""
        return sum(p.numel() for p in self.parameters())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images `[B,C,H,W]` (repeated over T) or event frames `[B,T,C,H,W]` -> the `[T,B,C,H,W]` sequence."""
        cfg = self.config
        return time_major(x, cfg.in_channels, cfg.img_size, cfg.timesteps, self.name)

    def forward_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The `[T,B,C,H,W]` input sequence -> the last block's spike-sum maps `[T,B,D,g,g]` (`[T,B,D,K,1]` when a
        selector gathered K tokens) and the keep mask the pooling applies (`spkprune.models.token_flow`)."""
        *early, (last_embed, _) = self.stages()
        for embed, blocks in early:
            x = embed(x)
            for block in blocks:
                x = block(x)
        return run_token_blocks(self, last_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The `[T,B,C,H,W]` input sequence -> the last block's spike-sum maps (`forward_blocks` without the mask)."""
        return self.forward_blocks(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `[B, classes]`. Every neuron starts from a zero membrane on every call."""
        maps, keep = self.forward_blocks(self.encode(x))
        pooled = mean_over_kept(maps.flatten(3), keep)  # [T,B,D]: mean over (kept) tokens
        return self.head(pooled.mean(0))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


__all__ = ["QKFormer", "QKFormerConfig"]
