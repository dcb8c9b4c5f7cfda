"""The spiking neuron used at every site of the Spikformer family.

`LIF` is spikingjelly 2.0's multi-step `LIFNode` with the original Spikformer settings (tau 2.0, hard reset to 0,
`detach_reset=True`, sigmoid surrogate with alpha 4, firing on `>=`). It differs from the plain node in three ways that
the rest of spkprune relies on:

- every call processes a whole `[T, ...]` sequence from a membrane potential of 0, so a forward pass never depends on
  the previous one (the original code needed `reset_net` after every batch);
- it can keep its last output (`record = True` -> `last_spikes`) so firing rates and spike maps can be read without
  reaching into the model;
- it has three numerically equivalent backends (`LIF.backend`, or per instance `site.backend`):

  * `"spikingjelly"`: spikingjelly's own multi-step LIF operator, the plain reference;
  * `"lean"` (default): `LeanLIF`, a custom autograd function that computes the same spikes bit for bit and the same
    gradients up to float rounding (1e-6 in the tests: the surrogate's product is formed in another order), but
    keeps only the charged
    potential H for the backward pass. spikingjelly's operator also keeps its input X and initial state for
    higher-order gradients, so the lean neuron halves what each site holds between forward and backward, and its loops
    work in place instead of allocating a list of per-step tensors;
  * `"compiled"`: for inference, the same per-step arithmetic fused by `torch.compile` into one kernel (one pass over
    the input instead of six per step; the first call in a process compiles for about 10 s). Where gradients are
    needed, the compiled training kernels (`lif_kernels.CompiledLIF`, compiled for each input shape, static; same
    spikes, gradients equal to the lean ones up to float rounding) on contiguous float32 input, else `"lean"`.

The kernels themselves live below this module, in `spkprune.models.lif_kernels` (and the spike packing in
`spkprune.models.packing`); this module holds only the `LIF` module that dispatches to them.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import neuron

from spkprune.models.lif_kernels import (
    TAU,
    THRESHOLD,
    compiled_lif,
    compiled_lif_inference,
    dense_order,
    inverse_order,
    lean_lif,
)
from spkprune.models.packing import pack_spikes  # noqa: F401  (re-exported: fastpath enters neurons.pack_spikes)

ATTN_THRESHOLD = 0.5
BACKENDS = ("spikingjelly", "lean", "compiled")


class LIF(neuron.LIFNode):
    """Multi-step LIF neuron; input and output are `[T, ...]`.

    `backend` is a class attribute (the default for every site) that an instance may override.
    """

    backend: str = "lean"

    def __init__(self, v_threshold: float = THRESHOLD, tau: float = TAU):
        super().__init__(tau=float(tau), v_threshold=float(v_threshold), v_reset=0.0, detach_reset=True, step_mode="m")
        self.record = False
        self.last_spikes: torch.Tensor | None = None

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.backend in ("lean", "compiled"):
            # Element-wise per step, so any layout can run as a contiguous view (channels-last images stay so).
            order = dense_order(x_seq)
            spikes = self._own_backend(x_seq if order is None else x_seq.permute(order))
            if order is not None:
                spikes = spikes.permute(inverse_order(order))
        elif self.backend == "spikingjelly":
            self.reset()
            spikes = super().forward(x_seq)
            self.reset()  # keep no membrane state between calls (and no reference to the graph)
        else:
            raise ValueError(f"unknown LIF backend {self.backend!r}; known: {', '.join(BACKENDS)}")
        if self.record:
            self.last_spikes = spikes.detach()
        return spikes

    def _own_backend(self, x_seq: torch.Tensor) -> torch.Tensor:
        if self.backend == "compiled":
            if not (torch.is_grad_enabled() and x_seq.requires_grad):
                return compiled_lif_inference(x_seq, self.tau, self.v_threshold)
            if x_seq.dtype == torch.float32 and x_seq.is_contiguous():
                return compiled_lif(x_seq, self.tau, self.v_threshold, self.surrogate_function.alpha)
        return lean_lif(x_seq, self.tau, self.v_threshold, self.surrogate_function.alpha)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend}"


def lif_sites(module: torch.nn.Module) -> dict[str, LIF]:
    """Every LIF below `module`, by module path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LIF)}


def layer_weights(model: torch.nn.Module, unused: tuple[str, ...] = ()) -> dict[str, torch.nn.Parameter]:
    """Conv (1-D and 2-D) and linear weights by state_dict key, the weights pruning works on: never biases, norms,
    embeddings, token-selector weights (`token_selectors.*`), nor modules whose name ends in one of `unused`."""
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, layers) and not name.startswith("token_selectors") and not name.endswith(unused)
    }
