"""What a masked model provably never uses: attention heads, MLP hidden channels and inner stem channels (where
they sit: `spkprune.models.structure_sites`, per family).

A structure is removable when removing it changes no output of the model in eval mode:

- **unread**: every weight that reads it is zero (the projection columns of a head, the fc2 column of an MLP
  channel, the next convolution's input channel of a stem channel). Whatever its neurons fire is multiplied by zero.
- **silent**: every weight that feeds its neurons is zero and they provably never fire. With zero weights a neuron's
  input is a constant, the layer bias passed through BatchNorm's running statistics, and a LIF neuron charged by a
  constant c from 0 climbs toward c without passing it (H = V + (c - V) / tau rounded to nearest stays <= c), so it
  fires at some time step only if c reaches the threshold. The constant is computed in float64 and must stay below
  the threshold by a margin larger than float32 rounding of the BatchNorm could move it; such a neuron never fires
  at any number of time steps. A head is silent when all its q, all its k or all its v neurons are (its attention
  product is then zero, which its attention neuron never fires on: in SDT the talking-heads neuron on k * v, in
  QKFormer's token attention the neuron on the summed q); a silent stem channel stays 0 through max-pooling.

Removing a silent stem channel can leave a channel of the next stage without input: the stem is checked again until
nothing changes. One head, one MLP channel and one channel per stem stage always stay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spkprune.models.structure_sites import WIDTH_FIELDS, Site, structure_sites

KINDS = {"heads": "attention heads", "mlp": "MLP hidden channels", "stem": "patch-splitting channels"}
MARGIN = 1e-5  # relative to the size of the BatchNorm terms: far above float32 rounding (about 6e-8 per step)


@dataclass
class Plan:
    """The structures that stay: the kept units of every structure site of the model."""

    sites: list[Site]
    kept: list[list[int]]  # per site, in the order of `sites`

    def widths(self, config):
        """`config` with the kept widths recorded per block and per stem stage (the kinds the model has)."""
        data = config.to_dict()
        for kind, field in WIDTH_FIELDS.items():
            places = [(site.place, len(kept)) for site, kept in zip(self.sites, self.kept) if site.kind == kind]
            if places:
                data[field] = [width for _, width in sorted(places)]
        return config.__class__.from_dict(data)

    def removed(self) -> dict[str, dict[str, list[int]]]:
        """The removed indices per kind and place: {"heads": {"block.0": [1, 3]}, "stem": {"proj_conv1": [...]}}."""
        out: dict[str, dict[str, list[int]]] = {}
        for kind in KINDS:
            for site, kept in zip(self.sites, self.kept):
                gone = sorted(set(range(site.units)) - set(kept))
                if site.kind == kind and gone:
                    place = site.layer if kind == "stem" else site.layer.rsplit(".", 1)[0]
                    out.setdefault(kind, {})[place] = gone
        return out


def silent_channels(layer: nn.Module, bn: nn.Module, lif: nn.Module, without_input: torch.Tensor) -> torch.Tensor:
    """Bool per output channel of `layer -> bn -> lif`: no input (`without_input`) and a constant that never fires."""
    channels = bn.running_mean.shape[0]
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(channels, dtype=torch.float64)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    shifted = (bias - bn.running_mean.detach().double()) * scale
    shift = bn.bias.detach().double()
    constant = shifted + shift
    slack = MARGIN * (1.0 + shifted.abs() + shift.abs())
    return without_input & (constant + slack < float(lif.v_threshold))


def _by_input(weight: torch.Tensor) -> torch.Tensor:
    """A weight `[out, in, ...]` as `[in, out * ...]`: everything that reads each input channel."""
    return weight.detach().transpose(0, 1).flatten(1)


def _kept(removable: torch.Tensor, among: list[int]) -> list[int]:
    """The units of `among` that are not `removable`; the first candidate when nothing would stay."""
    kept = [i for i in among if not removable[i]]
    return kept or list(among)[:1]


def _removable(model: nn.Module, site: Site, inputs: list[int] | None,
               readers: dict[str, list[int]] | None = None) -> torch.Tensor:
    """Bool per unit of `site`: nothing reads it (through the rows `readers[consumer]` of each consumer) or it never
    fires (with the producers' inputs restricted to `inputs`); None: all of them."""
    unread = torch.ones(site.units * site.width, dtype=torch.bool)
    for consumer in site.consumers:
        weight = model.get_submodule(consumer).weight.detach()
        rows = (readers or {}).get(consumer)
        weight = weight if rows is None else weight[rows]
        unread &= (_by_input(weight) == 0).all(1)
    silent = torch.zeros(site.units, dtype=torch.bool)
    for producer in site.producers:  # a head is silent when all its q, all its k or all its v neurons are
        layer = model.get_submodule(producer.layer)
        weight = layer.weight.detach()
        weight = weight if inputs is None else weight[:, inputs]
        quiet = silent_channels(layer, model.get_submodule(producer.norm), model.get_submodule(producer.neuron),
                                (weight.flatten(1) == 0).all(1))
        silent |= quiet.view(site.units, site.width).all(1)
    return unread.view(site.units, site.width).all(1) | silent


def _stem(model: nn.Module, stem: list[Site]) -> list[list[int]]:
    """Kept channels of the chained stem stages, checked again until removing some frees no other: a stage's
    producer reads only the kept channels of its source stage, and a consumer that is another stage's producer
    reads through that stage's kept rows only."""
    kept = {site.layer: list(range(site.units)) for site in stem}
    changed = True
    while changed:
        changed = False
        for site in stem:
            inputs = kept[site.source] if site.source is not None else None
            readers = {consumer: kept[consumer] for consumer in site.consumers if consumer in kept}
            still = _kept(_removable(model, site, inputs, readers), kept[site.layer])
            changed |= still != kept[site.layer]
            kept[site.layer] = still
    return [kept[site.layer] for site in stem]


def plan_compaction(model: nn.Module) -> Plan:
    """What `model` (weights already masked, BatchNorm running statistics as in eval) can lose exactly."""
    sites = structure_sites(model)
    stem = [site for site in sites if site.kind == "stem"]
    kept_stem = dict(zip(map(id, stem), _stem(model, stem)))
    kept = [kept_stem[id(site)] if site.kind == "stem" else _kept(_removable(model, site, None),
                                                                      list(range(site.units))) for site in sites]
    return Plan(sites, kept)
