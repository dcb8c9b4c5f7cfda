"""Where each family's removable structures sit: the layers structured pruning masks and `spkprune compact` cuts.

A `Site` is one layer of structures of one kind: `units` structures of `width` channels each. Structure u owns
channels `u*width:(u+1)*width` of every producer (the output rows of a convolution or linear layer with its
BatchNorm entries and the neurons that fire on them) and the same input columns of every consumer. A structure
reaches the rest of the model only through its consumer columns, so zeroing them (or cutting them out with the
producer rows) removes it exactly. The kinds:

- **heads**: q, k (and v) channels of one attention head, and the projection's columns. Every attention here
  keeps heads apart: Spikformer's and QKFormer's spiking self-attention (`q @ (k^T @ v)` per head, fixed scale, no
  softmax), QKFormer's Q-K token attention (a head's summed q masks its own k channels), and SDT's spike-driven
  attention, where q, k and v even interact channel by channel (`q * SN(sum over tokens of k * v)`), except that
  its DVS mode max-pools over neighbouring channels of one head: a head is the smallest unit that is always exact.
- **mlp**: one hidden channel: the first layer's output row with its BatchNorm entry and neuron (SDT: the `fc2_lif`
  before the second conv), and the second layer's input column. SDT with a hidden width equal to the embedding width
  (MLP ratio 1) adds the block's input to the hidden membrane: there the hidden channels belong to the residual
  stream and are no structure.
- **stem**: one output channel of an inner patch-splitting convolution, with its BatchNorm entry, neuron and max-pool,
  and the input channel of every convolution that reads it: the next convolution (Spikformer, SDT, QKFormer) and,
  in a QKFormer patch embedding whose shortcut taps that unit, `proj_res_conv`. The last convolution of a stem (of
  each QKFormer patch embedding) gives the width of the residual stream, never a structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from spkprune.errors import SpkpruneError
from spkprune.models.families import family_of

KINDS = ("heads", "mlp", "stem")
# The configuration field that records a kind's kept widths (`spkprune.models.widths`).
WIDTH_FIELDS = {"heads": "block_heads", "mlp": "block_mlp_hidden", "stem": "stem_channels"}


@dataclass(frozen=True)
class Producer:
    """A layer whose output rows make structures: its module path, its BatchNorm's and its neuron's."""

    layer: str
    norm: str
    neuron: str


@dataclass(frozen=True)
class Site:
    """One layer of `units` structures of `width` channels (see the module docstring)."""

    kind: str  # heads | mlp | stem
    layer: str  # block.0.attn | block.0.mlp | stage1.0.tssa | patch_embed.proj_conv1 (a stem site: its conv)
    place: int  # entry of the configuration's width field: the block (counted over all stages) or the stem stage
    producers: tuple[Producer, ...]
    consumers: tuple[str, ...]  # module paths of the layers that read the structures through input columns
    units: int
    width: int = 1
    unit_tensors: tuple[str, ...] = ()  # state_dict keys indexed by unit along every dimension (SDT's talking_heads)
    source: str | None = None  # the stem site (its layer) whose channels the producers read; None: the input stream

    def channels(self, units: Sequence[int]) -> list[int]:
        """The channels of structures `units`."""
        return [unit * self.width + i for unit in units for i in range(self.width)]


# -------------------------------------------------------------------------------------------- per family
def _producer(path: str, layer: str, norm: str, neuron: str) -> Producer:
    return Producer(f"{path}.{layer}", f"{path}.{norm}", f"{path}.{neuron}")


def _stem_sites(embed: nn.Module, path: str) -> list[Site]:
    """The inner stages of a four-stage stem named `proj_conv{,1,2,3}` / `proj_bn...` / `proj_lif...`."""
    suffixes = [name[len("proj_conv"):] for name, _ in embed.named_children() if name.startswith("proj_conv")]
    sites = []
    for stage, (this, after) in enumerate(zip(suffixes, suffixes[1:])):
        producer = _producer(path, f"proj_conv{this}", f"proj_bn{this}", f"proj_lif{this}")
        units = getattr(embed, f"proj_conv{this}").out_channels
        source = sites[-1].layer if sites else None
        sites.append(Site("stem", producer.layer, stage, (producer,), (f"{path}.proj_conv{after}",), units,
                          source=source))
    return sites


def _spikformer(model: nn.Module) -> list[Site]:
    sites = _stem_sites(model.patch_embed, "patch_embed")
    for b, block in enumerate(model.block):
        attn, mlp, path = block.attn, block.mlp, f"block.{b}"
        layer = {prefix: f"{prefix}_linear" if attn.conv_kind == "linear" else f"{prefix}_conv" for prefix in
                 ("q", "k", "v", "proj")}
        producers = tuple(_producer(f"{path}.attn", layer[p], f"{p}_bn", f"{p}_lif") for p in "qkv")
        sites.append(Site("heads", f"{path}.attn", b, producers, (f"{path}.attn.{layer['proj']}",), attn.num_heads,
                          attn.head_dim))
        fc1, fc2 = ("fc1_linear", "fc2_linear") if mlp.conv_kind == "linear" else ("fc1_conv", "fc2_conv")
        producer = _producer(f"{path}.mlp", fc1, "fc1_bn", "fc1_lif")
        sites.append(Site("mlp", f"{path}.mlp", b, (producer,), (f"{path}.mlp.{fc2}",), mlp.fc1_bn.num_features))
    return sites


def _sdt(model: nn.Module) -> list[Site]:
    sites = _stem_sites(model.patch_embed, "patch_embed")
    for b, block in enumerate(model.block):
        attn, mlp, path = f"block.{b}.attn", block.mlp, f"block.{b}.mlp"
        producers = tuple(_producer(attn, f"{p}_conv", f"{p}_bn", f"{p}_lif") for p in "qkv")
        sites.append(Site("heads", attn, b, producers, (f"{attn}.proj_conv",), block.attn.num_heads,
                          block.attn.head_dim, unit_tensors=(f"{attn}.talking_heads.weight",)))
        if not mlp.hidden_shortcut:
            producer = _producer(path, "fc1_conv", "fc1_bn", "fc2_lif")  # the neuron sits before fc2
            sites.append(Site("mlp", path, b, (producer,), (f"{path}.fc2_conv",), mlp.fc1_conv.out_channels))
    return sites


def _qkformer_stem(model: nn.Module) -> list[Site]:
    """The inner units of every patch embedding: each unit but the last, read by the next unit and, where the
    shortcut taps it, by `proj_res_conv`."""
    sites: list[Site] = []
    for e, (embed, _) in enumerate(model.stages(), 1):
        path, units = f"patch_embed{e}", embed.spec.units
        for u, (unit, after) in enumerate(zip(units, units[1:])):
            producer = _producer(path, f"{unit.prefix}_conv", f"{unit.prefix}_bn", f"{unit.prefix}_lif")
            consumers = (f"{path}.{after.prefix}_conv",) + ((f"{path}.proj_res_conv",)
                                                            if embed.spec.shortcut_from == u else ())
            width = getattr(embed, f"{unit.prefix}_conv").out_channels
            source = sites[-1].layer if u > 0 else None
            sites.append(Site("stem", producer.layer, len(sites), (producer,), consumers, width, source=source))
    return sites


def _qkformer(model: nn.Module) -> list[Site]:
    sites = _qkformer_stem(model)
    blocks = [(f"stage{s}.{j}", block) for s, (_, stage) in enumerate(model.stages(), 1) for j, block in
              enumerate(stage)]
    for b, (path, block) in enumerate(blocks):
        attn_path = f"{path}.{block.attention_name}"
        attn = getattr(block, block.attention_name)
        prefixes = "qkv" if hasattr(attn, "v_conv") else "qk"
        producers = tuple(_producer(attn_path, f"{p}_conv", f"{p}_bn", f"{p}_lif") for p in prefixes)
        sites.append(Site("heads", attn_path, b, producers, (f"{attn_path}.proj_conv",), attn.num_heads,
                          attn.head_dim))
        first, second = block.mlp.names
        producer = _producer(f"{path}.mlp", f"{first}_conv", f"{first}_bn", f"{first}_lif")
        units = getattr(block.mlp, f"{first}_conv").out_channels
        sites.append(Site("mlp", f"{path}.mlp", b, (producer,), (f"{path}.mlp.{second}_conv",), units))
    return sites


_SITES: dict[str, Callable[[nn.Module], list[Site]]] = {"spikformer": _spikformer, "sdt": _sdt, "qkformer": _qkformer}


def structure_sites(model: nn.Module) -> list[Site]:
    """Every structure site of `model`, in forward order (stem stages, then per block heads and MLP channels)."""
    family = family_of(model).name
    if family not in _SITES:
        raise SpkpruneError(f"the {family} family has no structures that can be removed whole yet")
    return _SITES[family](model)


def check_kinds(model: nn.Module, kinds: Sequence[str]) -> None:
    """One line when `kinds` names a structure kind `model` does not have (an SDT with MLP ratio 1 has no MLP
    structures: its hidden channels are the residual stream's)."""
    have = sorted({site.kind for site in structure_sites(model)}, key=KINDS.index)
    for kind in kinds:
        if kind not in have:
            raise SpkpruneError(f"--structures {kind}: {model.name} has no {kind} structures; choose from "
                                f"{', '.join(have)}")


__all__ = ["KINDS", "WIDTH_FIELDS", "Producer", "Site", "check_kinds", "structure_sites"]
