"""The layer table of a Spikformer, read off the model itself.

A shape-only forward on the `meta` device (no memory, no arithmetic) runs the real module graph once with batch 1;
hooks on every Conv/Linear record the MACs that call executed, hooks on every attention record the tokens and width
it saw, hooks on every LIF record how many neurons it updated. Token selectors are taken out of that trace (their
top-k needs real numbers) and read from their own Linear modules instead. Nothing here is a hand-kept table of sizes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from spkprune.errors import SpkpruneError
from spkprune.models import FAMILIES, family_of
from spkprune.models.neurons import LIF
from spkprune.models.spikformer import SSA

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)

_BLOCK = re.compile(r"^block\.(\d+)\.")
_SELECTOR = re.compile(r"^token_selectors\.(\d+)\.")


@dataclass(frozen=True)
class LayerSpec:
    """One row of the table, as traced with the model's own token counts.

    `macs` are the dense MACs per image of the traced forward (x T where the layer runs every time step, once for the
    head and the selector). `token_block` names the block whose token count the row scales with (None: fixed cost,
    e.g. the patch-splitting convs), `token_power` how (1: linear layers, 2: the attention products).
    """

    name: str
    kind: str  # conv | linear | attn | head | selector
    block: str  # sps | block.i | selector.i | head
    macs: int
    tokens: int  # tokens per time step the traced call saw (output positions for the patch-splitting convs)
    weight_key: str | None = None
    token_block: int | None = None
    token_power: int = 0
    analog_input: bool = False  # runs on real-valued input (MACs, not ACs), known without data


@dataclass
class Structure:
    """What one traced forward tells about a model (per image)."""

    model_name: str
    variant: str
    timesteps: int
    num_tokens: int
    embed_dim: int
    num_heads: int
    depth: int
    traced_tokens: list[int]  # tokens per block in the trace (the dense model: N everywhere)
    layers: list[LayerSpec]
    attention_heads: list[int] = field(default_factory=list)  # heads per block (fewer in a compacted block)
    lif_updates: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # site -> (updates, token_block)
    selector_locations: list[int] = field(default_factory=list)


    def attention_width(self, block: int) -> tuple[int, int]:
        """(width of q/k/v, heads) of block `block`'s attention: heads x embed_dim/num_heads."""
        heads = self.attention_heads[block] if self.attention_heads else self.num_heads
        return heads * (self.embed_dim // self.num_heads), heads


def scope_of(name: str) -> tuple[str, int | None]:
    """(block label, index of the block whose tokens scale it) for a module path."""
    if match := _BLOCK.match(name):
        index = int(match.group(1))
        return f"block.{index}", index
    if match := _SELECTOR.match(name):
        index = int(match.group(1))
        return f"selector.{index}", index - 1  # a selector sees the tokens the previous block kept
    if name.startswith("patch_embed."):
        return "sps", None
    return name.split(".")[0], None


def fan_in(module: nn.Module) -> int:
    """MACs per output element of a Conv/Linear."""
    if isinstance(module, nn.Linear):
        return module.in_features
    kernel = 1
    for size in module.kernel_size:
        kernel *= size
    return module.in_channels // module.groups * kernel


def out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def output_positions(module: nn.Module, out: torch.Tensor) -> int:
    """Output positions per call (tokens, or H*W for a 2-D conv): output elements over output channels and batch."""
    return out.numel() // out_channels(module) // out.shape[0]


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` on the meta device, without token selectors; no weight is copied."""
    memo: dict[int, object] = {id(model.token_selectors): nn.ModuleDict()}
    for tensor in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    skeleton = copy.deepcopy(model, memo).eval()
    for module in skeleton.modules():  # hooks that callers put on the real model must not see meta tensors
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):  # fmt: skip
            getattr(module, hooks, {}).clear()
    return skeleton


def dummy_input(model: nn.Module, device: str | torch.device = "meta") -> torch.Tensor:
    cfg = model.config
    size = (1, cfg.in_channels, cfg.img_size, cfg.img_size)
    if cfg.variant == "dvs":
        size = (1, cfg.timesteps, *size[1:])
    return torch.zeros(size, device=device)


def check_countable(model: nn.Module) -> None:
    """One line when `model`'s family is one this layer table cannot count honestly yet."""
    family = family_of(model)
    if not family.counted:
        raise SpkpruneError(
            f"flops report does not count the {family.name} family yet ({model.name}): the layer table traces "
            f"Spikformer blocks and attention only (counted families: {', '.join(counted_families())})"
        )


def counted_families() -> list[str]:
    return [family.name for family in FAMILIES.values() if family.counted]


def trace_structure(model: nn.Module) -> Structure:
    """Trace `model` once (shapes only) and return its layer table per image."""
    check_countable(model)
    cfg = model.config
    skeleton = meta_skeleton(model)
    layers: list[LayerSpec] = []
    traced_tokens = [0] * cfg.depth
    lif_updates: dict[str, tuple[int, int | None]] = {}
    attention: dict[int, tuple[int, int, int]] = {}  # block -> (T, tokens, width)
    handles = []

    def on_layer(name: str, module: nn.Module):
        def hook(_mod, _inputs, out):
            block, token_block = scope_of(name)
            first = not layers
            layers.append(
                LayerSpec(
                    name=name,
                    kind=_kind(name, module),
                    block=block,
                    macs=out.numel() * fan_in(module),  # batch 1: per image, x T where it runs per time step
                    tokens=output_positions(module, out),
                    weight_key=f"{name}.weight",
                    token_block=token_block,
                    token_power=1 if token_block is not None else 0,
                    # the encoding conv sees images (events are counts: ACs); the head sees the pooled mean
                    analog_input=(first and cfg.variant != "dvs") or name == "head",
                )
            )

        return hook

    def on_attention(index: int):
        def hook(mod, inputs):
            T, _B, N, _C = inputs[0].shape
            traced_tokens[index] = N
            attention[index] = (T, N, mod.num_heads * mod.head_dim)

        return hook

    def on_lif(name: str):
        def hook(_mod, _inputs, out):
            lif_updates[name] = (out.numel(), scope_of(name)[1])

        return hook

    for name, module in skeleton.named_modules():
        if isinstance(module, WEIGHT_LAYERS):
            handles.append(module.register_forward_hook(on_layer(name, module)))
        elif isinstance(module, SSA):
            handles.append(module.register_forward_pre_hook(on_attention(int(name.split(".")[1]))))
        elif isinstance(module, LIF):
            handles.append(module.register_forward_hook(on_lif(name)))
    try:
        with torch.no_grad():
            skeleton(dummy_input(skeleton))
    finally:
        for handle in handles:
            handle.remove()
    layers = _with_selectors(_with_attention(layers, attention), _selector_layers(model, traced_tokens))
    return Structure(
        model_name=getattr(model, "name", type(model).__name__),
        variant=cfg.variant,
        timesteps=next(iter(attention.values()))[0] if attention else cfg.timesteps,
        num_tokens=model.num_tokens,
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        depth=cfg.depth,
        traced_tokens=traced_tokens,
        layers=layers,
        attention_heads=[block.attn.num_heads for block in model.block],
        lif_updates=lif_updates,
        selector_locations=sorted(int(k) for k in model.token_selectors),
    )


def _kind(name: str, module: nn.Module) -> str:
    if name == "head":
        return "head"
    if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
        return "conv"
    return "linear"


def _with_attention(layers: list[LayerSpec], attention: dict[int, tuple[int, int, int]]) -> list[LayerSpec]:
    """Insert the two spike x spike products after each block's v projection (their place in the forward).

    The paper convention is counted: Q.K^T then (QK^T).V, n^2 * D MACs each per time step, whichever order the
    model happens to execute (see `attention_macs` for the other order)."""
    rows: list[LayerSpec] = []
    for layer in layers:
        rows.append(layer)
        match = re.match(r"^block\.(\d+)\.attn\.v_(linear|conv)$", layer.name)
        if match:
            index = int(match.group(1))
            T, n, width = attention[index]
            for product in ("qk", "av"):
                rows.append(
                    LayerSpec(
                        name=f"block.{index}.attn.{product}",
                        kind="attn",
                        block=f"block.{index}",
                        macs=T * n * n * width,
                        tokens=n,
                        token_block=index,
                        token_power=2,
                    )
                )
    return rows


def _with_selectors(layers: list[LayerSpec], selector_rows: list[LayerSpec]) -> list[LayerSpec]:
    """Selector rows go just before the first row of the block they select for (their place in the forward)."""
    rows: list[LayerSpec] = []
    pending = list(selector_rows)
    for layer in layers:
        ahead = [s for s in pending if layer.block == f"block.{s.block.split('.')[1]}"]
        rows += ahead
        pending = [s for s in pending if s not in ahead]
        rows.append(layer)
    return rows + pending


def _selector_layers(model: nn.Module, traced_tokens: list[int]) -> list[LayerSpec]:
    """Selector Linears run once per image on the time-averaged tokens that enter them (non-binary: MACs)."""
    rows = []
    for key, selector in sorted(model.token_selectors.items(), key=lambda kv: int(kv[0])):
        entering = traced_tokens[int(key) - 1]
        for sub, module in selector.named_modules():
            if isinstance(module, nn.Linear):
                name = f"token_selectors.{key}.{sub}"
                rows.append(
                    LayerSpec(
                        name=name,
                        kind="selector",
                        block=f"selector.{key}",
                        macs=entering * module.in_features * module.out_features,
                        tokens=entering,
                        weight_key=f"{name}.weight",
                        token_block=int(key) - 1,
                        token_power=1,
                        analog_input=True,
                    )
                )
    return rows


def attention_macs(T: int, tokens: int, width: int, num_heads: int, order: str) -> tuple[int, int]:
    """MACs of the two attention products: `qk_v` = (Q.K^T).V (n^2*D each), `q_kv` = Q.(K^T.V) (n*D*d_h each)."""
    if order == "qk_v":
        return T * tokens * tokens * width, T * tokens * tokens * width
    head_dim = width // num_heads
    return T * tokens * width * head_dim, T * tokens * width * head_dim
