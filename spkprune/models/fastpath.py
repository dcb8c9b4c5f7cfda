"""Fast paths for training and inference, selectable per model, none of them changing what the model computes.

- `set_neuron_backend(model, "lean" | "spikingjelly")`: which LIF implementation every site uses (see `neurons`).
- `prepare_for_training(model, backend="lean", pack_spikes=True, fuse=True, compile=False)`: lean neurons, every
  BatchNorm + LIF pair fused into one autograd function that keeps only the BatchNorm input for backward
  (`spkprune.models.fused`), spikes kept as bool for the backward pass (spikes are exactly 0/1), q, k and v from one
  matrix product and one fused site, and max-pooling that keeps only its indices. With `compile`, the fused kernels
  and every other neuron (backend `"compiled"`) run through `torch.compile`. `backend="spikingjelly"` is the plain
  baseline: separate BatchNorm modules and spikingjelly's LIF operator, in the original code's layout.
- `fold_batchnorm(model)`: an eval-only copy whose BatchNorms are folded into the preceding conv / linear (computed
  in float64, then cast), whose token projections skip the transposes the BatchNorm needed.
- `prepare_for_inference(model, fold_bn=True, compile=False)`: eval mode, lean neurons (with `compile`, one fused
  `torch.compile` kernel for every neuron), optional folding, channels-last patch splitting, and CPU batches split
  into pieces whose activations stay below 32 MiB (the same logits; see `Spikformer.inference_chunk_bytes`). Run the
  result under `torch.inference_mode()`.
- `set_channels_last(model)`: the patch-splitting convolutions on NHWC images (oneDNN's faster layout on the CPU;
  the training and inference fast paths set it). Neurons and the fused BatchNorm + LIF run on the contiguous
  `[T, B, H, W, C]` view of such maps, and the final image-to-token transpose becomes a view.

Folding changes float rounding (one product `(W * g) x` instead of `g * (W x)`), and so does channels-last
(another summation order in the convolutions and the BatchNorm statistics), so a pre-activation that lands within
a few ulps of a threshold can fire on one path and not the other. `spike_mismatches` measures this; the tests and
`docs/performance.md` report how often it happens.
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn as nn

from spkprune.errors import SpkpruneError
from spkprune.models import fused, neurons
from spkprune.models.neurons import BACKENDS, LIF

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_PACK_HOOKS = "_spkprune_pack_spikes_hooks"


def set_neuron_backend(model: nn.Module, name: str) -> nn.Module:
    """Make every LIF below `model` use backend `name` ("lean" or "spikingjelly"); returns `model`."""
    if name not in BACKENDS:
        raise SpkpruneError(f"unknown neuron backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    for module in model.modules():
        if isinstance(module, LIF):
            module.backend = name
    return model


def neuron_backends(model: nn.Module) -> set[str]:
    """The backends in use below `model`."""
    return {m.backend for m in model.modules() if isinstance(m, LIF)}


# ---- training --------------------------------------------------------------------------------------------------------


def enable_spike_packing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Keep spikes saved for the backward pass as bool during `model(...)` (forward hooks; lean neurons only)."""
    for handle in getattr(model, _PACK_HOOKS, ()):
        handle.remove()
    handles = []
    if enabled:
        state = {}

        def enter(_module, _args):
            state.setdefault("stack", []).append(neurons.pack_spikes().__enter__())

        def leave(_module, _args, _output):
            stack = state.get("stack")
            if stack:
                stack.pop().__exit__(None, None, None)

        handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    object.__setattr__(model, _PACK_HOOKS, handles)
    return model


def set_fused_bn_lif(model: nn.Module, kernels: str | None = "eager") -> nn.Module:
    """Route every training-mode BatchNorm + LIF pair below `model` through `FusedBatchNormLIF` with `kernels`
    ("eager" or "compiled"), or through the separate modules again (None)."""
    if kernels is not None and kernels not in fused.KERNELS:
        raise SpkpruneError(f"unknown fused kernels {kernels!r}; choose one of: {', '.join(fused.KERNELS)}")
    for module in model.modules():
        if hasattr(type(module), "fuse_bn_lif"):
            module.fuse_bn_lif = kernels
    return model


def set_channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the patch-splitting convolutions below `model` on channels-last (NHWC) images, or on NCHW (the original
    layout) again. The same arithmetic in another summation order: equal to float rounding."""
    for module in model.modules():
        if hasattr(type(module), "channels_last"):
            module.channels_last = enabled
    return model


def prepare_for_training(
    model: nn.Module, backend: str = "lean", pack_spikes: bool = True, fuse: bool = True, compile: bool = False,
    channels_last: bool | None = None,
) -> nn.Module:
    """Select the training path in place: neuron backend, fused BatchNorm + LIF, bool spike packing and channels-last
    images (by default with lean neurons only), and with `compile` the fused kernels and the remaining neurons
    (backend "compiled") through `torch.compile`.
    Returns `model`."""
    lean = backend != "spikingjelly"
    if compile and lean:
        _check_compile_available()
    set_neuron_backend(model, "compiled" if compile and lean else backend)
    set_fused_bn_lif(model, ("compiled" if compile else "eager") if fuse and lean else None)
    enable_spike_packing(model, pack_spikes and lean)
    set_channels_last(model, lean if channels_last is None else channels_last)
    return model


# ---- inference -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_bn_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode `bn` (running statistics) into `layer`'s weight and bias, in float64, in place."""
    dtype = layer.weight.dtype
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    weight = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    layer.weight.copy_(weight.to(dtype))
    folded_bias = (bias - bn.running_mean.double()) * scale + bn.bias.double()
    if layer.bias is None:
        layer.bias = nn.Parameter(folded_bias.to(dtype), requires_grad=False)
    else:
        layer.bias.copy_(folded_bias.to(dtype))


def _fold_pairs(model: nn.Module):
    """(parent, weight-layer name, bn name) for every conv/linear followed by its BatchNorm in the Spikformer naming:
    `<p>_linear|<p>_conv` + `<p>_bn` in token projections, `proj_conv<s>` + `proj_bn<s>`, `rpe_conv` + `rpe_bn`."""
    for parent in model.modules():
        children = dict(parent.named_children())
        for name, bn in children.items():
            if not isinstance(bn, _BN_TYPES) or "_bn" not in name:
                continue
            prefix, suffix = name.split("_bn", 1)
            for layer_name in (f"{prefix}_linear{suffix}", f"{prefix}_conv{suffix}"):
                if isinstance(children.get(layer_name), _WEIGHT_TYPES):
                    yield parent, layer_name, name


def _folded_project(self, prefix: str, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """`TokenProjection.project` once its BatchNorm is folded: the projection alone, on `[TB, N, C]` tokens."""
    layer = self.weight_layer(prefix)
    if self.conv_kind == "linear":
        return layer(x)
    weight = layer.weight.reshape(layer.weight.shape[0], -1)  # kernel-1 conv == linear over channels
    return nn.functional.linear(x, weight, layer.bias)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-only copy of `model` with every BatchNorm folded into the preceding conv / linear (and replaced by
    `nn.Identity`). Not for training or for loading state_dicts: its keys differ from the original."""
    folded = _copy_without_graph(model).eval()
    for parent, layer_name, bn_name in list(_fold_pairs(folded)):
        fold_bn_into(getattr(parent, layer_name), getattr(parent, bn_name))
        setattr(parent, bn_name, nn.Identity())
        if hasattr(parent, "project") and hasattr(parent, "weight_layer"):
            parent.project = types.MethodType(_folded_project, parent)
    for p in folded.parameters():
        p.requires_grad_(False)
    folded.folded_batchnorm = True
    return folded


def _copy_without_graph(model: nn.Module) -> nn.Module:
    """`copy.deepcopy(model)`, leaving out tensors that belong to an autograd graph (e.g. a selector's last decision,
    kept for the training loss), which cannot be deep-copied; the copy gets None in their place."""
    stashed = [
        (module, key, value)
        for module in model.modules()
        for key, value in vars(module).items()
        if isinstance(value, torch.Tensor) and not value.is_leaf
    ]
    for module, key, _ in stashed:
        module.__dict__[key] = None
    try:
        return copy.deepcopy(model)
    finally:
        for module, key, value in stashed:
            module.__dict__[key] = value


INFERENCE_CHUNK_BYTES = 32 * 2**20  # glibc's largest mmap threshold: blocks up to it are reused, not re-faulted


def prepare_for_inference(
    model: nn.Module, fold_bn: bool = True, compile: bool = False, channels_last: bool = True,
    chunk_bytes: int | None = INFERENCE_CHUNK_BYTES,
) -> nn.Module:
    """An eval-mode model for fast inference: lean neurons, BatchNorm folded (a copy) unless `fold_bn=False` (then
    `model` itself, switched to eval), channels-last patch splitting, and CPU batches run in pieces whose largest
    activation stays under `chunk_bytes` (None: whole batches). `compile=True` runs every neuron through one fused
    `torch.compile` kernel (same spikes; about 10 s to compile once per process). Call the result under
    `torch.inference_mode()`."""
    fast = fold_batchnorm(model) if fold_bn else model.eval()
    set_neuron_backend(fast, "compiled" if compile else "lean")
    enable_spike_packing(fast, False)
    set_channels_last(fast, channels_last)
    if hasattr(type(fast), "inference_chunk_bytes"):
        fast.inference_chunk_bytes = chunk_bytes
    return fast


def _check_compile_available() -> None:
    try:
        import torch._inductor  # noqa: F401  (the probe itself: does this torch build have inductor?)
    except Exception as err:  # pragma: no cover - depends on the torch build
        raise SpkpruneError(f"torch.compile is not available here ({type(err).__name__}: {err}); run without --compile") from err


@torch.no_grad()
def spike_mismatches(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Per neuron site, how many spikes of `candidate(x)` differ from `reference(x)` (both recorded)."""
    ref_sites, cand_sites = _sites(reference), _sites(candidate)
    for site in (*ref_sites.values(), *cand_sites.values()):
        site.record = True
    try:
        reference(x)
        candidate(x)
        return {
            name: int((site.last_spikes != cand_sites[name].last_spikes).sum())
            for name, site in ref_sites.items()
        }
    finally:
        for site in (*ref_sites.values(), *cand_sites.values()):
            site.record, site.last_spikes = False, None


def _sites(model: nn.Module) -> dict[str, LIF]:
    model = getattr(model, "_orig_mod", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, LIF)}
