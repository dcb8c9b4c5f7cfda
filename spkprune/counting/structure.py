"""The layer table of a spiking transformer of any counted family, read off the model itself.

A shape-only forward on the `meta` device (no memory, no arithmetic) runs the real module graph once with batch 1;
hooks on every Conv/Linear record the MACs that call executed, hooks on every attention's neurons record the time
steps, tokens and widths it saw, hooks on every LIF record how many neurons it updated. Blocks are found as the
parents of the attention modules (`block.i` in Spikformer and the SDT, `stageS.j` in QKFormer), numbered in forward
order; each block's token count and width come from its own hooks, so hierarchical stages, compacted (per-block)
widths and gathered tokens need nothing from the configuration. Token selectors are taken out of that trace (their
top-k needs real numbers) and read from their own Linear modules instead. Nothing here is a hand-kept table of sizes.

What a family's attention costs is its own arithmetic, declared once per attention class in
`spkprune.counting.attention` (SSA products n^2 * D; the SDT's and QKFormer's token attentions, masks and additions
linear in n).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from spkprune.counting.attention import ATTENTION_KINDS, ORDER_DEPENDENT, AttentionSpec, attention_modules
from spkprune.errors import SpkpruneError
from spkprune.models import FAMILIES, family_of
from spkprune.models.neurons import LIF

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)

_SELECTOR = re.compile(r"^token_selectors\.(\d+)\.")


def owner_of(name: str, blocks: list[str]) -> int | None:
    """Index of the block that module path `name` lies in, or None."""
    for index, path in enumerate(blocks):
        if name.startswith(path + "."):
            return index
    return None


def scope_of(name: str, blocks: list[str]) -> tuple[str, int | None]:
    """(row group, index of the block whose tokens scale it) for a module path: `block.i` / `stageS.j` for the
    blocks, `selector.i` (scaled by the block before it), `sps` for a `patch_embed.` stem, else the top module."""
    if match := _SELECTOR.match(name):
        index = int(match.group(1))
        return f"selector.{index}", index - 1
    index = owner_of(name, blocks)
    if index is not None:
        return blocks[index], index
    if name.startswith("patch_embed."):
        return "sps", None
    return name.split(".")[0], None


# ----------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class LayerSpec:
    """One row of the table, as traced with the model's own token counts.

    `macs` are the dense MACs (operations, for the attention rows) per image of the traced forward (x T where the
    layer runs every time step, once for a head after the mean over T and for the selector). `token_block` names
    the block whose token count the row scales with (None: fixed cost, e.g. the patch-splitting convs),
    `token_power` how (1: linear layers and linear attention rows, 2: the SSA products). `op` is `mask` for the
    mask rows of the linear attentions (no accumulate, not priced), otherwise None (decided by the input).
    """

    name: str
    kind: str  # conv | linear | attn | head | selector
    block: str  # sps | block.i | stageS.j | patch_embedS | selector.i | head
    macs: int
    tokens: int  # tokens per time step the traced call saw (output positions for the patch-splitting convs)
    weight_key: str | None = None
    token_block: int | None = None
    token_power: int = 0
    analog_input: bool = False  # runs on real-valued input (MACs, not ACs), known without data
    op: str | None = None
    product: str | None = None  # qk | av: an SSA product (its cost depends on the multiplication order)


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
    traced_tokens: list[int]  # tokens per block in the trace (the dense model: each stage's N)
    layers: list[LayerSpec]
    attention_heads: list[int] = field(default_factory=list)  # heads per block (fewer in a compacted block)
    lif_updates: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # site -> (updates, token_block)
    selector_locations: list[int] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)  # block module paths in forward order
    segments: list[int] = field(default_factory=list)  # per block: the index of the first block of its token run
    attention: list[AttentionSpec] = field(default_factory=list)  # per block

    def attention_width(self, block: int) -> tuple[int, int]:
        """(width of q, heads) of block `block`'s attention."""
        spec = self.attention[block]
        return spec.width, spec.heads

    def segment_of(self, block: int) -> list[int]:
        """The blocks that share block `block`'s tokens: no token-changing layer (a patch embedding) between them."""
        start = self.segments[block]
        return [b for b in range(self.depth) if self.segments[b] == start]


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
            f"flops report does not count the {family.name} family yet ({model.name}): its blocks and attention are "
            f"not in the layer table (counted families: {', '.join(counted_families())})"
        )


def counted_families() -> list[str]:
    return [family.name for family in FAMILIES.values() if family.counted]


def _from_spikes(tensor: torch.Tensor, spike_ids: set[int]) -> bool:
    """True when `tensor` is a neuron's output or a view of one (so a layer reading it reads spikes)."""
    while tensor is not None:
        if id(tensor) in spike_ids:
            return True
        tensor = tensor._base
    return False


class _Tracer:
    """The hooks of one shape-only forward."""

    def __init__(self, skeleton: nn.Module):
        self.cfg = skeleton.config
        self.attentions = attention_modules(skeleton)
        self.blocks = [path.rsplit(".", 1)[0] for path, _, _ in self.attentions]  # the attentions' parents
        self.layers: list[LayerSpec] = []
        self.lif_updates: dict[str, tuple[int, int | None]] = {}
        self.spikes: dict[str, torch.Tensor] = {}  # neuron path -> output (meta)
        self.spike_ids: set[int] = set()
        self.keep_alive: list[torch.Tensor] = []  # the neuron outputs, so that their ids stay theirs
        self.events: list[tuple[str, int | None]] = []  # ("layer", owner block) / ("block", index), forward order
        self.handles = []
        token_free = {f"{path}.{name}" for path, _, kind in self.attentions for name in kind.token_free}
        for name, module in skeleton.named_modules():
            if isinstance(module, WEIGHT_LAYERS):
                self.handles.append(module.register_forward_hook(self._on_layer(name, module)))
            elif isinstance(module, LIF):
                self.handles.append(module.register_forward_hook(self._on_lif(name, name in token_free)))
        for index, path in enumerate(self.blocks):
            block = skeleton.get_submodule(path)
            self.handles.append(block.register_forward_pre_hook(self._on_block(index)))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _on_block(self, index: int):
        def hook(_module, _args):
            self.events.append(("block", index))

        return hook

    def _on_layer(self, name: str, module: nn.Module):
        def hook(_mod, inputs, out):
            block, token_block = scope_of(name, self.blocks)
            first = not self.layers
            self.events.append(("layer", token_block))
            head_on_spikes = name == "head" and _from_spikes(inputs[0], self.spike_ids)
            self.layers.append(
                LayerSpec(
                    name=name,
                    kind=_kind(name, module),
                    block=block,
                    macs=out.numel() * fan_in(module),  # batch 1: per image, x T where it runs per time step
                    tokens=output_positions(module, out),
                    weight_key=f"{name}.weight",
                    token_block=token_block,
                    token_power=1 if token_block is not None else 0,
                    # the encoding conv sees images (events are counts: ACs); a head sees the pooled mean, unless
                    # a neuron comes first (the SDT's head_lif: the head then reads spikes, T times)
                    analog_input=(first and self.cfg.variant != "dvs") or (name == "head" and not head_on_spikes),
                )
            )

        return hook

    def _on_lif(self, name: str, token_free: bool):
        def hook(_mod, _inputs, out):
            owner = None if token_free else owner_of(name, self.blocks)
            self.lif_updates[name] = (out.numel(), owner)
            self.spikes[name] = out
            self.spike_ids.add(id(out))
            self.keep_alive.append(out)

        return hook

    # ---- after the forward ------------------------------------------------------------------------------------
    def attention_specs(self) -> list[AttentionSpec]:
        specs = []
        for path, module, kind in self.attentions:
            tokens = {p[0]: kind.to_tokens(self.spikes[f"{path}.{p}"]) for p in kind.spikes}  # q/k/v: [T,B,N,C]
            T, _B, N, _C = tokens["q"].shape
            widths = {part: t.shape[3] for part, t in tokens.items()}
            specs.append(AttentionSpec(path, kind.name, T, N, widths, module.num_heads))
        return specs

    def segments(self, traced_tokens: list[int]) -> list[int]:
        """Per block, the first block of its run: a run ends where a layer outside the blocks (a patch embedding
        between stages) runs, or where the token count changes."""
        starts, current, outside = [], None, False
        for event, value in self.events:
            if event == "layer":
                outside = outside or value is None
                continue
            index = value
            if current is None or outside or traced_tokens[index] != traced_tokens[current]:
                current = index
            starts.append(current)
            outside = False
        return starts


def trace_structure(model: nn.Module) -> Structure:
    """Trace `model` once (shapes only) and return its layer table per image."""
    check_countable(model)
    cfg = model.config
    skeleton = meta_skeleton(model)
    if not attention_modules(skeleton):
        raise SpkpruneError(f"{model.name}: no attention of a kind the layer table knows, so no block to count")
    tracer = _Tracer(skeleton)
    try:
        with torch.no_grad():
            skeleton(dummy_input(skeleton))
    finally:
        tracer.close()
    attention = tracer.attention_specs()
    traced_tokens = [spec.tokens for spec in attention]
    segments = tracer.segments(traced_tokens)
    layers = _with_attention(tracer.layers, attention, tracer.blocks)
    layers = _with_selectors(layers, _selector_layers(model, traced_tokens, segments), tracer.blocks)
    return Structure(
        model_name=getattr(model, "name", type(model).__name__),
        variant=cfg.variant,
        timesteps=attention[0].timesteps,
        num_tokens=model.num_tokens,
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        depth=len(tracer.blocks),
        traced_tokens=traced_tokens,
        layers=layers,
        attention_heads=[spec.heads for spec in attention],
        lif_updates=tracer.lif_updates,
        selector_locations=sorted(int(k) for k in model.token_selectors),
        blocks=tracer.blocks,
        segments=segments,
        attention=attention,
    )


def _kind(name: str, module: nn.Module) -> str:
    if name == "head":
        return "head"
    if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
        return "conv"
    return "linear"


def _with_attention(layers: list[LayerSpec], attention: list[AttentionSpec], blocks: list[str]) -> list[LayerSpec]:
    """Insert each attention's spike x spike rows just before its output projection (their place in the forward).

    SSA: the paper convention is counted, Q.K^T then (QK^T).V, n^2 * D MACs each per time step, whichever order the
    model happens to execute (see `attention_macs` for the other order). The linear attentions: n * D per row."""
    pending = {spec.path: spec for spec in attention}
    rows: list[LayerSpec] = []
    for layer in layers:
        path = next((p for p in pending if layer.name.startswith(p + ".proj_")), None)
        if path is not None:
            rows += _attention_rows(pending.pop(path), blocks)
        rows.append(layer)
    for spec in pending.values():  # an attention without an output projection: its rows close its block
        at = max((i for i, r in enumerate(rows) if r.name.startswith(spec.path + ".")), default=len(rows) - 1)
        rows[at + 1 : at + 1] = _attention_rows(spec, blocks)
    return rows


def _attention_rows(spec: AttentionSpec, blocks: list[str]) -> list[LayerSpec]:
    index = blocks.index(spec.path.rsplit(".", 1)[0])
    kind = next(k for k in ATTENTION_KINDS.values() if k.name == spec.kind)
    rows = []
    for row in kind.rows:
        width, n = spec.widths[row.width_of], spec.tokens
        rows.append(
            LayerSpec(
                name=f"{spec.path}.{row.suffix}",
                kind="attn",
                block=blocks[index],
                macs=spec.timesteps * n**row.power * width,
                tokens=n,
                token_block=index,
                token_power=row.power,
                op="mask" if row.op == "mask" else None,
                product=row.suffix if row.suffix in ORDER_DEPENDENT else None,
            )
        )
    return rows


def _with_selectors(layers: list[LayerSpec], selector_rows: list[LayerSpec], blocks: list[str]) -> list[LayerSpec]:
    """Selector rows go just before the first row of the block they select for (their place in the forward)."""
    rows: list[LayerSpec] = []
    pending = list(selector_rows)
    for layer in layers:
        ahead = [s for s in pending if layer.block == blocks[int(s.block.split(".")[1])]]
        rows += ahead
        pending = [s for s in pending if s not in ahead]
        rows.append(layer)
    return rows + pending


def _selector_layers(model: nn.Module, traced_tokens: list[int], segments: list[int]) -> list[LayerSpec]:
    """Selector Linears run once per image on the time-averaged tokens that enter them (non-binary: MACs). A selector
    sees the tokens the block before it kept when that block shares its tokens, else its own block's full count."""
    rows = []
    for key, selector in sorted(model.token_selectors.items(), key=lambda kv: int(kv[0])):
        block = int(key)
        if block >= len(traced_tokens):
            raise SpkpruneError(f"{model.name} has a token selector before block {block} but only "
                                f"{len(traced_tokens)} blocks")
        entering = traced_tokens[block]
        follows = block > 0 and segments[block] == segments[block - 1]
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
                        token_block=block - 1 if follows else None,
                        token_power=1 if follows else 0,
                        analog_input=True,
                    )
                )
    return rows
