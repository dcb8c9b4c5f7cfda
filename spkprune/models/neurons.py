"""The spiking neuron used at every site of the Spikformer family.

`LIF` is spikingjelly 2.0's multi-step `LIFNode` with the original Spikformer settings (tau 2.0, hard reset to 0,
`detach_reset=True`, sigmoid surrogate with alpha 4, firing on `>=`). It differs from the plain node in two ways that
the rest of spkprune relies on:

- every call processes a whole `[T, ...]` sequence from a membrane potential of 0, so a forward pass never depends on
  the previous one (the original code needed `reset_net` after every batch);
- it can keep its last output (`record = True` -> `last_spikes`) so firing rates and spike maps can be read without
  reaching into the model.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import neuron

TAU = 2.0
THRESHOLD = 1.0
ATTN_THRESHOLD = 0.5


class LIF(neuron.LIFNode):
    """Multi-step LIF neuron; input and output are `[T, ...]`."""

    def __init__(self, v_threshold: float = THRESHOLD, tau: float = TAU):
        super().__init__(tau=float(tau), v_threshold=float(v_threshold), v_reset=0.0, detach_reset=True, step_mode="m")
        self.record = False
        self.last_spikes: torch.Tensor | None = None

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self.reset()
        spikes = super().forward(x_seq)
        self.reset()  # keep no membrane state between calls (and no reference to the graph)
        if self.record:
            self.last_spikes = spikes.detach()
        return spikes


def lif_sites(module: torch.nn.Module) -> dict[str, LIF]:
    """Every LIF below `module`, by module path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LIF)}
