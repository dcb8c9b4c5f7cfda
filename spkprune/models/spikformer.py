"""The Spikformer family (Zhou et al., ICLR 2023), faithful to the original code and checkpoint-compatible.

Module names, parameter shapes and the order of operations follow `ZK-Zhou/spikformer` (commit 6212689) for its three
variants, so an original state_dict loads with `strict=True` and this model's state_dict loads into the original code.
Inside the blocks tokens always travel as `[T, B, N, C]`; the DVS and ImageNet variants keep their original Conv1d /
Conv2d modules and apply them to that layout (a kernel-1 convolution is a linear map over channels).

Beyond the original, blocks accept a token mask `[B, N]` (1 = kept) so that a token selector can train with masked
tokens that are exactly equivalent to removed ones: masked tokens are excluded as keys and values in attention, from
BatchNorm statistics in training mode, and from the final pooling.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from spkprune.errors import SpkpruneError
from spkprune.models.fused import batch_norm_lif, can_fuse, can_pool_spikes, max_pool_spikes
from spkprune.models.neurons import ATTN_THRESHOLD, LIF, layer_weights, lif_sites
from spkprune.models.packing import packing_active, register_small_integers, register_spikes
from spkprune.models.presets import SpikformerConfig
from spkprune.models.token_flow import SEQUENCE, run_token_blocks

_STAGE_SUFFIXES = ("", "1", "2", "3")


def _trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> None:
    # timm's trunc_normal_ default: cut at +-2 (absolute), not at +-2 std.
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


def _batch_norm_tokens(bn: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """BatchNorm over the channels of tokens `x: [TB, N, C]`, statistics from kept tokens only when training.

    `keep` is a bool `[TB, N]` or None. In eval mode BatchNorm is per element, so masking changes nothing.
    """
    spatial = (1,) if isinstance(bn, nn.BatchNorm2d) else ()

    def native(t: torch.Tensor) -> torch.Tensor:  # [..., C] rows -> the layout the BN module expects
        return t.reshape(*t.shape, *spatial)

    if keep is None or not bn.training:
        out = bn(native(x.transpose(1, 2)))  # the original code's layout, made contiguous as it does
        return out.reshape(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2).contiguous()
    rows = x[keep]  # [K, C]
    normed = bn(native(rows)).reshape(rows.shape)
    out = x.new_zeros(x.shape)
    out[keep] = normed
    return out


class TokenProjection(nn.Module):
    """Base for layers that own a projection + BN + LIF triple in the original naming (`<p>_linear|conv`, `<p>_bn`,
    `<p>_lif`). `project` applies `<p>_linear|conv` + `<p>_bn` to tokens `[TB, N, C]`; `project_spike` adds the LIF,
    through `FusedBatchNormLIF` when `fuse_bn_lif` names its kernels (the training fast path) and no token is
    masked."""

    conv_kind: str = "linear"  # linear | conv1d | conv2d
    fuse_bn_lif: str | None = None  # None, "eager" or "compiled"

    def _make(self, prefix: str, c_in: int, c_out: int, bias: bool, threshold: float | None = None) -> None:
        if self.conv_kind == "linear":
            setattr(self, f"{prefix}_linear", nn.Linear(c_in, c_out, bias=bias))
        elif self.conv_kind == "conv1d":
            setattr(self, f"{prefix}_conv", nn.Conv1d(c_in, c_out, kernel_size=1, stride=1, bias=bias))
        else:
            setattr(self, f"{prefix}_conv", nn.Conv2d(c_in, c_out, kernel_size=1, stride=1, bias=bias))
        bn_cls = nn.BatchNorm2d if self.conv_kind == "conv2d" else nn.BatchNorm1d
        setattr(self, f"{prefix}_bn", bn_cls(c_out))
        setattr(self, f"{prefix}_lif", LIF() if threshold is None else LIF(threshold))

    def weight_layer(self, prefix: str) -> nn.Module:
        return getattr(self, f"{prefix}_linear" if self.conv_kind == "linear" else f"{prefix}_conv")

    def linear(self, prefix: str, x: torch.Tensor) -> torch.Tensor:
        """`<p>_linear|conv` on tokens `[TB, N, C]`."""
        layer = self.weight_layer(prefix)
        if self.conv_kind == "linear":
            return layer(x)
        if self.conv_kind == "conv1d":
            return layer(x.transpose(1, 2)).transpose(1, 2)
        return layer(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)

    def project(self, prefix: str, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return _batch_norm_tokens(getattr(self, f"{prefix}_bn"), self.linear(prefix, x), keep)

    def project_spike(self, prefix: str, x: torch.Tensor, keep: torch.Tensor | None, T: int) -> torch.Tensor:
        """Tokens `[TB, N, C_in]` -> spikes `[T, B, N, C_out]` of `<p>_lif(<p>_bn(<p>_linear(x)))`."""
        bn, lif = getattr(self, f"{prefix}_bn"), getattr(self, f"{prefix}_lif")
        if self.fuse_bn_lif and keep is None and can_fuse(bn, lif, x):
            y = self.linear(prefix, x)
            return batch_norm_lif(y.reshape(T, -1, *y.shape[1:]), bn, lif, -1, self.fuse_bn_lif)
        return self.spike(prefix, self.project(prefix, x, keep), T)

    def spike(self, prefix: str, x: torch.Tensor, T: int) -> torch.Tensor:
        """Projection output `[TB, N, C]` -> spikes `[T, B, N, C]`."""
        return getattr(self, f"{prefix}_lif")(x.reshape(T, -1, *x.shape[1:]))


class SSA(TokenProjection):
    """Spiking self-attention: q, k, v spikes, `(q k^T) v * scale` without softmax, attention LIF at 0.5, projection."""

    def __init__(self, cfg: SpikformerConfig, index: int = 0):
        super().__init__()
        self.conv_kind = "linear" if cfg.variant == "cifar" else "conv1d"
        self.num_heads = cfg.heads_of(index)  # a compacted block may keep fewer heads, each of the original width
        self.head_dim = cfg.head_dim
        self.scale = cfg.attn_scale
        dim, inner = cfg.embed_dim, self.num_heads * self.head_dim
        qkv_bias = cfg.variant == "cifar"  # the CIFAR code builds nn.Linear with its default bias
        for prefix in ("q", "k", "v"):
            self._make(prefix, dim, inner, bias=qkv_bias)
        self.attn_lif = LIF(ATTN_THRESHOLD)
        self._make("proj", inner, dim, bias=True)

    def _heads(self, s: torch.Tensor) -> torch.Tensor:  # [T,B,N,h*d] -> [T,B,h,N,d]
        T, B, N, _ = s.shape
        heads = s.reshape(T, B, N, self.num_heads, self.head_dim).permute(0, 1, 3, 2, 4)
        if packing_active():  # the copy the matmul would make anyway, made here so it is saved as bool
            heads = heads.contiguous()
            register_spikes(heads)
        return heads

    def _qkv_spikes(self, flat: torch.Tensor, keep_tb: torch.Tensor | None, T: int) -> tuple[torch.Tensor, ...]:
        """q, k, v spikes `[T, B, N, C]`. On the training fast path with linear projections: one matrix product with
        the three weights stacked and one fused BatchNorm + LIF over the 3C channels (each channel's statistics and
        spikes as its own site's; one larger product runs faster than three and its input is unpacked once)."""
        prefixes = ("q", "k", "v")
        bns = tuple(getattr(self, f"{p}_bn") for p in prefixes)
        lifs = tuple(getattr(self, f"{p}_lif") for p in prefixes)
        layers = [self.weight_layer(p) for p in prefixes]
        joint = (
            self.fuse_bn_lif
            and keep_tb is None
            and self.conv_kind == "linear"
            and len({layer.bias is None for layer in layers}) == 1
            and can_fuse(bns, lifs, flat)
        )
        if not joint:
            return tuple(self.project_spike(p, flat, keep_tb, T) for p in prefixes)
        weight = torch.cat([layer.weight for layer in layers])
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        y = nn.functional.linear(flat, weight, bias)
        spikes = batch_norm_lif(y.reshape(T, -1, *y.shape[1:]), bns, lifs, -1, self.fuse_bn_lif)
        return spikes.split([layer.out_features for layer in layers], dim=-1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        T, B, N, C = x.shape
        flat = x.flatten(0, 1)
        keep_tb = None if keep is None else keep.unsqueeze(0).expand(T, B, N).reshape(T * B, N)
        q, k, v = (self._heads(s) for s in self._qkv_spikes(flat, keep_tb, T))
        if keep is not None:  # masked tokens are neither keys nor values
            token_mask = keep.to(k.dtype).view(1, B, 1, N, 1)
            k, v = k * token_mask, v * token_mask
        # Spikes are 0/1 and the scale is a power of two, so every product order gives bit-identical results; the
        # cheaper order is taken (the ImageNet code's q (k^T v) is the linear-attention order).
        if N > self.head_dim:
            out = (q @ (k.transpose(-2, -1) @ v)) * self.scale
        else:
            out = ((q @ k.transpose(-2, -1)) * self.scale) @ v
        out = self.attn_lif(out.transpose(2, 3).reshape(T, B, N, self.num_heads * self.head_dim))
        return self.project_spike("proj", out.flatten(0, 1), keep_tb, T)


class MLP(TokenProjection):
    """fc1 (C -> rC) + BN + LIF, fc2 (rC -> C) + BN + LIF."""

    def __init__(self, cfg: SpikformerConfig, index: int = 0):
        super().__init__()
        self.conv_kind = {"cifar": "linear", "dvs": "conv1d", "imagenet": "conv2d"}[cfg.variant]
        hidden = cfg.mlp_hidden_of(index)
        self._make("fc1", cfg.embed_dim, hidden, bias=True)
        self._make("fc2", hidden, cfg.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        T, B, N, _ = x.shape
        keep_tb = None if keep is None else keep.unsqueeze(0).expand(T, B, N).reshape(T * B, N)
        h = self.project_spike("fc1", x.flatten(0, 1), keep_tb, T)
        return self.project_spike("fc2", h.flatten(0, 1), keep_tb, T)


class Block(nn.Module):
    """`x + SSA(x)`, then `x + MLP(x)`. `norm1`/`norm2` exist in the original state_dict but are never called."""

    def __init__(self, cfg: SpikformerConfig, index: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.attn = SSA(cfg, index)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)
        self.mlp = MLP(cfg, index)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        register_small_integers(x)  # the residual stream sums spike maps: saved for backward as uint8
        x = x + self.attn(x, keep)
        register_small_integers(x)
        return x + self.mlp(x, keep)


class SPS(nn.Module):
    """Spiking patch splitting: 4 conv-BN-LIF stages (C/8, C/4, C/2, C), max-pools after the last `num_pools`
    stages, then the relative position embedding `rpe_lif(rpe_bn(rpe_conv(x))) + x`."""

    fuse_bn_lif: str | None = None  # BN + LIF through FusedBatchNormLIF in training: None, "eager" or "compiled"
    # Images as NHWC (the fast paths): oneDNN's convolutions are faster on it, and the final image-to-token
    # transpose becomes a view. The original code's layout (NCHW) is the default.
    channels_last: bool = False

    def __init__(self, cfg: SpikformerConfig):
        super().__init__()
        dim = cfg.embed_dim
        channels = [cfg.in_channels, *cfg.stem_widths, dim]
        self.pooled_stages = tuple(range(4 - cfg.num_pools, 4))
        for i, suffix in enumerate(_STAGE_SUFFIXES):
            setattr(self, f"proj_conv{suffix}", nn.Conv2d(channels[i], channels[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"proj_bn{suffix}", nn.BatchNorm2d(channels[i + 1]))
            setattr(self, f"proj_lif{suffix}", LIF())
            if i in self.pooled_stages:
                setattr(self, f"maxpool{suffix}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.rpe_conv = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(dim)
        self.rpe_lif = LIF()

    def _conv(self, conv, x: torch.Tensor) -> torch.Tensor:
        y = conv(x)
        # A one-channel input is NCHW and channels-last at once, and oneDNN then answers in NCHW: converted here.
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y

    def _conv_bn_lif(self, x: torch.Tensor, conv, bn, lif, T: int) -> torch.Tensor:
        if self.fuse_bn_lif and can_fuse(bn, lif, x):
            y = self._conv(conv, x)
            return batch_norm_lif(y.reshape(T, -1, *y.shape[1:]), bn, lif, 2, self.fuse_bn_lif).flatten(0, 1)
        y = bn(self._conv(conv, x))
        return lif(y.reshape(T, -1, *y.shape[1:])).flatten(0, 1)

    def _pool(self, pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_bn_lif and can_pool_spikes(pool, x):  # the training fast path: keeps only the indices
            return max_pool_spikes(x, pool)
        return pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T,B,C,H,W] -> [T,B,N,C]
        T = x.shape[0]
        x = x.flatten(0, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i, suffix in enumerate(_STAGE_SUFFIXES):
            layers = (getattr(self, f"proj_{kind}{suffix}") for kind in ("conv", "bn", "lif"))
            x = self._conv_bn_lif(x, *layers, T)
            if i in self.pooled_stages:
                x = self._pool(getattr(self, f"maxpool{suffix}"), x)
        x_feat = x
        x = self._conv_bn_lif(x, self.rpe_conv, self.rpe_bn, self.rpe_lif, T) + x_feat
        x = x.reshape(T, -1, *x.shape[1:])
        return x.flatten(-2).transpose(-1, -2).contiguous()  # [T,B,N,C] rows: every later matmul reads them so


class Spikformer(nn.Module):
    """A Spikformer of any variant. Build it with `spkprune.create_model(name)`."""

    # Set by `prepare_for_inference`: without autograd on the CPU, run a batch in pieces whose largest activation
    # stays under this many bytes. glibc's malloc hands out blocks above 32 MiB as fresh memory maps that are
    # returned on free, so every such tensor is page-faulted in again on every pass; smaller blocks are reused.
    # Off while a neuron site records its spikes; a token selector's `last_mask` then describes the last piece.
    inference_chunk_bytes: int | None = None

    def __init__(self, cfg: SpikformerConfig, preset: str | None = None):
        super().__init__()
        self.config = cfg
        self.preset = preset
        if cfg.variant == "dvs":  # created and initialised by the DVS code, never used in forward
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.embed_dim))
        self.patch_embed = SPS(cfg)
        self.block = nn.ModuleList(Block(cfg, index) for index in range(cfg.depth))
        if cfg.variant == "dvs":
            self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.ln_eps)  # unused, as in the original
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.token_selectors = nn.ModuleDict()
        if cfg.variant == "dvs":
            _trunc_normal_(self.pos_embed)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            _trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- what the pruning, counting and selection code needs -------------------------------------------------

    @property
    def name(self) -> str:
        return self.preset or f"spikformer-{self.config.depth}-{self.config.embed_dim}-{self.config.variant}"

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block."""
        return self.config.num_tokens

    @property
    def token_dim(self) -> int:
        return self.config.embed_dim

    def prunable_weights(self) -> dict[str, nn.Parameter]:
        """Conv and linear weights by state_dict key; never biases, norms, `pos_embed` or token-selector weights."""
        return layer_weights(self)

    def neuron_sites(self) -> dict[str, LIF]:
        """Every LIF by its original module path, in forward order."""
        return lif_sites(self)

    token_layout = SEQUENCE  # blocks pass `[T, B, N, C]` token lists (spkprune.models.token_flow)

    def token_blocks(self) -> list[tuple[int, nn.Module]]:
        """The blocks that work on the selectors' tokens, by index: all of them."""
        return list(enumerate(self.block))

    def selector_locations(self) -> list[int]:
        """Blocks before which a token selector may sit (block 0 always sees every token)."""
        return list(range(1, self.config.depth))

    def used_parameter_count(self) -> int:
        """Parameters that take part in forward (the papers' count): all but the LayerNorms and `pos_embed`,
        which the original code creates and never calls."""
        unused = {id(p) for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        if hasattr(self, "pos_embed"):
            unused.add(id(self.pos_embed))
        return sum(p.numel() for p in self.parameters() if id(p) not in unused)

    # ---- forward ---------------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Validate the input and turn it into the `[T, B, C, H, W]` sequence the patch splitting expects."""
        cfg = self.config
        expected = f"[B,{cfg.in_channels},{cfg.img_size},{cfg.img_size}]"
        if cfg.variant == "dvs":
            expected = f"[B,T,{cfg.in_channels},{cfg.img_size},{cfg.img_size}] event frames"
            ok = x.dim() == 5 and tuple(x.shape[2:]) == (cfg.in_channels, cfg.img_size, cfg.img_size)
        else:
            ok = x.dim() == 4 and tuple(x.shape[1:]) == (cfg.in_channels, cfg.img_size, cfg.img_size)
        if not ok:
            raise SpkpruneError(f"{self.name} expects input {expected}, received {list(x.shape)}")
        if cfg.variant == "dvs":
            return x.transpose(0, 1).contiguous()
        return x.unsqueeze(0).repeat(cfg.timesteps, 1, 1, 1, 1)

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the blocks (and any token selectors) on `[T, B, N, C]` tokens; returns tokens and the keep mask the
        pooling applies (`spkprune.models.token_flow`)."""
        return run_token_blocks(self, tokens)

    def pool(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Mean over (kept) tokens, then over time: `[T, B, N, C]` -> `[B, C]`."""
        if keep is None:
            return tokens.mean(2).mean(0)
        weights = keep.to(tokens.dtype)
        summed = (tokens * weights.view(1, *weights.shape, 1)).sum(2)
        return (summed / weights.sum(1).clamp_min(1).view(1, -1, 1)).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunk = self._inference_chunk(x)
        if chunk is not None:  # every sample is independent in eval mode: the same logits, piece by piece
            return torch.cat([self._forward(part) for part in x.split(chunk)])
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.encode(x))
        tokens, keep = self.forward_tokens(tokens)
        return self.head(self.pool(tokens, keep))

    def activation_bytes_per_sample(self) -> int:
        """Bytes of the largest float32 activation one sample makes: a patch-splitting stage at its full
        resolution or the MLP's hidden tokens, over all time steps."""
        cfg = self.config
        channels = [*cfg.stem_widths, cfg.embed_dim, cfg.embed_dim]
        side, widest = cfg.img_size, 0
        for stage, c in enumerate(channels):
            widest = max(widest, c * side * side)
            if stage in self.patch_embed.pooled_stages:
                side //= 2
        hidden = max(cfg.mlp_hidden_of(index) for index in range(cfg.depth))
        widest = max(widest, cfg.num_tokens * max(hidden, cfg.embed_dim))
        return 4 * cfg.timesteps * widest

    def _inference_chunk(self, x: torch.Tensor) -> int | None:
        """Samples per piece for chunked inference, or None to run the batch whole."""
        if (
            self.inference_chunk_bytes is None
            or self.training
            or torch.is_grad_enabled()
            or x.device.type != "cpu"
            or any(site.record for site in self.neuron_sites().values())  # a record keeps one whole batch
        ):
            return None
        chunk = max(1, self.inference_chunk_bytes // self.activation_bytes_per_sample())
        return chunk if chunk < x.shape[0] else None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def check_state_dict(model: Spikformer, state_dict) -> None:
    """Raise one clear SpkpruneError when `state_dict` does not fit `model` (missing, unexpected, wrong shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} expected {list(own[k].shape)} received {list(state_dict[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    problems = []
    for label, items in (("mismatched shapes", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            shown = ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise SpkpruneError(f"state_dict does not fit {model.name}: " + "; ".join(problems))


def build(cfg: SpikformerConfig, preset: str | None = None) -> Spikformer:
    return Spikformer(cfg, preset)


__all__ = ["Spikformer", "SpikformerConfig", "build", "check_state_dict"]
