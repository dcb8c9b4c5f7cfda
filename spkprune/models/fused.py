"""BatchNorm (training mode) and a LIF neuron fused into one autograd function: the training fast path.

Every projection of a Spikformer is `conv/linear -> BatchNorm -> LIF`. Run as separate modules in training, the
BatchNorm keeps its input Y for the backward pass, the neuron keeps its charged potential H, and both allocate their
outputs and gradients. `FusedBatchNormLIF` keeps only Y (and the per-channel batch mean and 1/std): in the backward
pass it recomputes the normalised input (the same kernel on the same input, so bit-identical) and the membrane
potentials, runs the LIF's surrogate-gradient recursion in place, and hands the result to BatchNorm's own backward
kernel. That halves the float tensors held per neuron site.

BatchNorm is PyTorch's own kernel (`torch.native_batch_norm`, so the running statistics, momentum and eps behave as
the module's), on a layout without transposes: token rows `[T*B*N, C]`, images `[T*B, C, H, W]`, or channels-last
images as the rows of their contiguous `[T, B, H, W, C]` view. The neuron is the lean LIF's arithmetic (tau, hard
reset to 0, detached reset, sigmoid surrogate), so the spikes are bit-identical to `LIF(BatchNorm(y))` on the same
layout. With `kernels="compiled"` the neuron loops run through `torch.compile` with static shapes (a few seconds per
site shape, once per process; inductor caches the kernels on disk): the forward charge, and in the backward pass one
kernel that forms the normalised values from Y itself (no recomputed tensor) and runs the surrogate recursion; the
results agree with the eager kernels to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from spkprune.models import neurons

KERNELS = ("eager", "compiled")
_COMPILED: dict[str, object] = {}
_SHAPES_PER_KERNEL = 64  # site shapes (and last-batch variants) one process may compile each kernel for


def _compiled(name: str):
    """The `torch.compile`d version of `_FUNCTIONAL[name]`, made on first use."""
    if name not in _COMPILED:
        # Static shapes: inductor's kernels for known sizes and strides run about twice as fast as its dynamic-shape
        # ones here; a model has a handful of site shapes, each compiled once per process (cached on disk).
        compiled = torch.compile(_FUNCTIONAL[name], dynamic=False)

        def call(*args, compiled=compiled):
            # Detached aliases are not views: dynamo would otherwise guard on (and recompile for) each view's base.
            with torch._dynamo.config.patch(recompile_limit=_SHAPES_PER_KERNEL):
                return compiled(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

        _COMPILED[name] = call
    return _COMPILED[name]


# ---- neuron kernels: eager (in place, shared with the lean LIF) and functional (for torch.compile) ------------------


def _backward_eager(z, grad, tau: float, threshold: float, alpha: float):
    neurons.charge_in_place(z, tau, threshold)
    return neurons.surrogate_backward(z, grad, tau, threshold, alpha, overwrite=True)


def _backward_functional(z, grad, tau: float, threshold: float, alpha: float):
    """dL/dz of the LIF from `z [T, ...]` (a tensor or a list of per-step tensors) and dL/dS."""
    v = torch.zeros_like(z[0])
    potentials = []
    for t in range(len(z)):
        h = (z[t] - v) / tau + v
        potentials.append(h)
        v = torch.where(h >= threshold, torch.zeros_like(h), h)
    grad_z = [None] * len(potentials)
    carry = None
    for t in range(len(potentials) - 1, -1, -1):
        h = potentials[t]
        s = torch.sigmoid(alpha * (h - threshold))
        grad_h = grad[t] * ((1 - s) * s * alpha)
        if carry is not None:
            grad_h = grad_h + torch.where(h >= threshold, torch.zeros_like(carry), carry)
        grad_z[t] = grad_h / tau
        carry = grad_h - grad_h / tau
    return torch.stack(grad_z)


def _backward_from_input_functional(y, grad, mean, invstd, weight, bias, channel_dim: int, tau: float,
                                    threshold: float, alpha: float):
    """`_backward_functional` on the BatchNorm input: the normalised values are formed inside the same kernel (with
    BatchNorm's per-channel scale and shift, as its CPU kernel forms them) instead of being recomputed to memory.
    Every tensor is viewed as `[T, outer, C, inner]` so that all steps share one loop nest (without it inductor
    wrote the normalised values of every step to memory first: 13 % slower on a `[4, 16, 64, 1536]` site)."""
    outer = 1
    for size in y.shape[1:channel_dim]:
        outer *= size
    steps = (y.shape[0], outer, y.shape[channel_dim], -1)
    y, grad = y.reshape(steps), grad.reshape(steps)
    mean, invstd, weight, bias = (t.view(1, -1, 1) for t in (mean, invstd, weight, bias))
    scale = invstd * weight
    shift = bias - mean * scale
    return _backward_functional([y[t] * scale + shift for t in range(y.shape[0])], grad, tau, threshold, alpha)


def _charge_in_place_functional(z, tau: float, threshold: float):
    """The compiled inference neuron's arithmetic, its spikes written over `z` (the BatchNorm output, dead after this)
    as floats: inductor's CPU code stores bool outputs about 7x slower than floats."""
    z.copy_(neurons._lif_inference(z, tau, threshold))


_FUNCTIONAL = {"charge": _charge_in_place_functional, "backward_from_input": _backward_from_input_functional}


def _native_view(y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """`y [T, ...]` in the layout `native_batch_norm` takes without copies: rows `[-1, C]` when the channels are
    last, `[T*B, C, ...]` when they follow the batch dimension."""
    if channel_dim == y.dim() - 1:
        return y.reshape(-1, y.shape[-1])
    if channel_dim == 2:
        return y.flatten(0, 1)
    raise ValueError(f"channels must be the last dimension or dimension 2, got {channel_dim} of {y.dim()}")


class FusedBatchNormLIF(torch.autograd.Function):
    """`LIF(BatchNorm(y))` in training mode for `y: [T, ...]` whose channels lie at `channel_dim` (of y)."""

    @staticmethod
    def forward(ctx, y, weight, bias, bn: nn.Module, lif: nn.Module, channel_dim: int, kernels: str):
        channel_dim = channel_dim % y.dim()
        native = _native_view(y, channel_dim)
        running_mean, running_var, momentum = _running_stats(bn)
        # The normalised values, then (in place) the float spikes, in a tensor of y's shape: returning a view of
        # BatchNorm's output instead kept about one spike map more alive per step (measured).
        out = torch.empty_like(y, memory_format=torch.contiguous_format)
        mean, invstd = y.new_empty(y.shape[channel_dim]), y.new_empty(y.shape[channel_dim])
        torch.ops.aten.native_batch_norm.out(native, weight, bias, running_mean, running_var, True, momentum, bn.eps,
                                             out=_native_view(out, channel_dim), save_mean=mean, save_invstd=invstd)
        tau, threshold = float(lif.tau), float(lif.v_threshold)
        if kernels == "compiled":
            _compiled("charge")(out, tau, threshold)
            as_bool = None
        else:
            as_bool = neurons.charge_in_place(out, tau, threshold)
            out.copy_(as_bool)
        ctx.save_for_backward(y, weight, bias, mean, invstd)
        ctx.settings = (tau, threshold, float(lif.surrogate_function.alpha), channel_dim, float(bn.eps), kernels)
        neurons.register_spikes(out, as_bool)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, weight, bias, mean, invstd = ctx.saved_tensors
        tau, threshold, alpha, channel_dim, eps, kernels = ctx.settings
        native = _native_view(y, channel_dim)
        if kernels == "compiled":
            grad_z = _compiled("backward_from_input")(
                y, grad.contiguous(), mean, invstd, weight, bias, channel_dim, tau, threshold, alpha
            ).view(y.shape)
        else:
            # The same kernel on the same input gives the forward's normalised values bit for bit.
            z = torch.native_batch_norm(native, weight, bias, None, None, True, 0.0, eps)[0]
            grad_z = _backward_eager(z.view(y.shape), grad.contiguous(), tau, threshold, alpha)
        grad_y, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_z.view(native.shape), native, weight, None, None, mean, invstd, True, eps,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
        )
        grad_y = grad_y.view(y.shape) if grad_y is not None else None
        return grad_y, grad_w, grad_b, None, None, None, None


def _running_stats(bn: nn.Module):
    """What `nn.BatchNorm*.forward` passes to the kernel in training mode (and its batch counter update)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return None, None, 0.0
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return bn.running_mean, bn.running_var, momentum


def can_fuse(bn: nn.Module, lif: nn.Module, y: torch.Tensor) -> bool:
    """Whether `lif(bn(y))` may take the fused path: training-mode affine BatchNorm, lean neuron, gradients on."""
    return (
        isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and bn.training
        and bn.affine
        and getattr(lif, "backend", None) in ("lean", "compiled")
        and torch.is_grad_enabled()
        and (y.requires_grad or bn.weight.requires_grad)
    )


def batch_norm_lif(
    y: torch.Tensor, bn: nn.Module, lif: nn.Module, channel_dim: int, kernels: str = "eager"
) -> torch.Tensor:
    """Spikes `[T, ...]` of `lif(bn(y))` through the fused function (callers check `can_fuse` first). A `y` that is
    a permuted dense tensor (channels-last images) runs as its contiguous view; the spikes keep `y`'s layout."""
    order = neurons.dense_order(y)
    if order is None:
        spikes = FusedBatchNormLIF.apply(y, bn.weight, bn.bias, bn, lif, channel_dim, kernels)
    else:
        channel_dim = order.index(channel_dim % y.dim())
        spikes = FusedBatchNormLIF.apply(y.permute(order), bn.weight, bn.bias, bn, lif, channel_dim, kernels)
        spikes = spikes.permute(neurons.inverse_order(order))
    if getattr(lif, "record", False):
        lif.last_spikes = spikes.detach()
    return spikes


__all__ = ["KERNELS", "FusedBatchNormLIF", "batch_norm_lif", "can_fuse"]
