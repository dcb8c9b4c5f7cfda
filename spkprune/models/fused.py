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
site shape, once per process; inductor caches the kernels on disk): forward, BatchNorm's statistics pass alone and
one kernel that normalises and charges (BatchNorm's output is never written); backward, one kernel that forms the
normalised values from Y itself and runs the surrogate recursion; the results agree with the eager kernels to float
rounding. Several sites whose channels lie side by side in one Y (q, k and v from one product) run as one.

The neuron arithmetic, eager and compiled, is `spkprune.models.lif_kernels` (where `CompiledLIF`, the neuron without
BatchNorm on the compiled kernels, lives too); this module adds the BatchNorm around it, and `MaxPoolSpikes`
(max-pooling of spikes that keeps only its indices for backward).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from spkprune.models import lif_kernels
from spkprune.models.packing import register_spikes

KERNELS = ("eager", "compiled")


def _native_view(y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """`y [T, ...]` in the layout `native_batch_norm` takes without copies: rows `[-1, C]` when the channels are
    last, `[T*B, C, ...]` when they follow the batch dimension."""
    if channel_dim == y.dim() - 1:
        return y.reshape(-1, y.shape[-1])
    if channel_dim == 2:
        return y.flatten(0, 1)
    raise ValueError(f"channels must be the last dimension or dimension 2, got {channel_dim} of {y.dim()}")


class FusedBatchNormLIF(torch.autograd.Function):
    """`LIF(BatchNorm(y))` in training mode for `y: [T, ...]` whose channels lie at `channel_dim` (of y). `bns` are
    the BatchNorms of consecutive channel ranges of y (usually one; q, k and v side by side in the joint projection),
    with the same eps and momentum; `weight` and `bias` their parameters concatenated."""

    @staticmethod
    def forward(ctx, y, weight, bias, bns: tuple, lif: nn.Module, channel_dim: int, kernels: str):
        channel_dim = channel_dim % y.dim()
        native = _native_view(y, channel_dim)
        running_mean, running_var, momentum = _running_stats(bns)
        eps, tau, threshold = float(bns[0].eps), float(lif.tau), float(lif.v_threshold)
        if kernels == "compiled":
            # BatchNorm's statistics pass alone (the first half of its training kernel: the same mean, variance and
            # running-statistics update), then one kernel that normalises and charges: no normalised tensor.
            mean, var = torch.batch_norm_update_stats(native, running_mean, running_var, momentum)
            invstd = (var.double() + eps).rsqrt().to(var.dtype)
            charge = lif_kernels.compiled_kernel("charge_from_input")
            out = charge(y, mean, invstd, weight, bias, channel_dim, tau, threshold)
            as_bool = None
        else:
            # The normalised values in a tensor of y's shape (returning a view of BatchNorm's own output kept about
            # one spike map more alive per step: measured), then the float spikes over it.
            out = torch.empty_like(y, memory_format=torch.contiguous_format)
            mean, invstd = y.new_empty(y.shape[channel_dim]), y.new_empty(y.shape[channel_dim])
            torch.ops.aten.native_batch_norm.out(native, weight, bias, running_mean, running_var, True, momentum, eps,
                                                 out=_native_view(out, channel_dim), save_mean=mean, save_invstd=invstd)
            as_bool = lif_kernels.charge_in_place(out, tau, threshold)
            out.copy_(as_bool.view(torch.uint8))  # see packing.bool_to
        if len(bns) > 1 and running_mean is not None:
            _store_running_stats(bns, running_mean, running_var)
        ctx.save_for_backward(y, weight, bias, mean, invstd)
        ctx.settings = (tau, threshold, float(lif.surrogate_function.alpha), channel_dim, eps, kernels)
        register_spikes(out, as_bool)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, weight, bias, mean, invstd = ctx.saved_tensors
        tau, threshold, alpha, channel_dim, eps, kernels = ctx.settings
        native = _native_view(y, channel_dim)
        if kernels == "compiled":
            grad_z = lif_kernels.compiled_kernel("backward_from_input")(
                y, grad.contiguous(), mean, invstd, weight, bias, channel_dim, tau, threshold, alpha
            ).view(y.shape)
        else:
            # The same kernel on the same input gives the forward's normalised values bit for bit.
            z = torch.native_batch_norm(native, weight, bias, None, None, True, 0.0, eps)[0]
            grad_z = lif_kernels.backward_in_place(z.view(y.shape), grad.contiguous(), tau, threshold, alpha)
        grad_y, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_z.view(native.shape), native, weight, None, None, mean, invstd, True, eps,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
        )
        grad_y = grad_y.view(y.shape) if grad_y is not None else None
        return grad_y, grad_w, grad_b, None, None, None, None


class MaxPoolSpikes(torch.autograd.Function):
    """`nn.MaxPool2d` (no dilation, floor mode) on a spike map for training: keeps only the argmax indices for the
    backward pass (whose kernel reads nothing of the input but its geometry), where the module also keeps the input
    and, with spike packing, turns its bool copy back into floats; the pooled spikes are registered for packing."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding):
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding)
        ctx.save_for_backward(indices)
        ctx.geometry = (x.shape, x.stride(), kernel_size, stride, padding)
        register_spikes(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        shape, strides, kernel_size, stride, padding = ctx.geometry
        # The kernel reads only the input's geometry: an unwritten tensor of that geometry stands in for it.
        like_input = torch.empty_strided(shape, strides, dtype=grad.dtype, device=grad.device)
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, like_input, kernel_size, stride, padding, [1, 1], False, indices
        )
        return grad_input, None, None, None


def max_pool_spikes(x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
    """`pool(x)` for a spike map `x` through `MaxPoolSpikes` (callers check `can_pool_spikes` first)."""
    pair = nn.modules.utils._pair
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return MaxPoolSpikes.apply(x, list(pair(pool.kernel_size)), list(pair(stride)), list(pair(pool.padding)))


def can_pool_spikes(pool: nn.Module, x: torch.Tensor) -> bool:
    """Whether `pool(x)` may take `MaxPoolSpikes`: a plain `nn.MaxPool2d` and gradients wanted."""
    return (
        type(pool) is nn.MaxPool2d
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
        and torch.is_grad_enabled()
        and x.requires_grad
    )


def _module_running_stats(bn: nn.Module):
    """What `nn.BatchNorm*.forward` passes to the kernel in training mode (and its batch counter update)."""
    if not bn.track_running_stats or bn.running_mean is None:
        return None, None, 0.0
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return bn.running_mean, bn.running_var, momentum


def _running_stats(bns: tuple):
    """`_module_running_stats` of one BatchNorm, or of several side by side: concatenated copies (written back by
    `_store_running_stats`); `can_fuse` made sure they agree on the momentum."""
    stats = [_module_running_stats(bn) for bn in bns]
    if len(stats) == 1 or stats[0][0] is None:
        return stats[0]
    return torch.cat([s[0] for s in stats]), torch.cat([s[1] for s in stats]), stats[0][2]


def _store_running_stats(bns: tuple, running_mean: torch.Tensor, running_var: torch.Tensor) -> None:
    sizes = [bn.num_features for bn in bns]
    for bn, mean, var in zip(bns, running_mean.split(sizes), running_var.split(sizes)):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


def _sites(module) -> tuple:
    return tuple(module) if isinstance(module, (tuple, list)) else (module,)


def can_fuse(bn, lif, y: torch.Tensor) -> bool:
    """Whether `lif(bn(y))` may take the fused path: training-mode affine BatchNorm, lean neuron, gradients on. `bn`
    and `lif` may be sequences of sites side by side (see `batch_norm_lif`), which must then share every setting."""
    bns, lifs = _sites(bn), _sites(lif)
    alone = all(
        isinstance(b, nn.modules.batchnorm._BatchNorm)
        and b.training
        and b.affine
        and getattr(n, "backend", None) in ("lean", "compiled")
        for b, n in zip(bns, lifs, strict=True)
    )
    if not (alone and torch.is_grad_enabled() and (y.requires_grad or any(b.weight.requires_grad for b in bns))):
        return False
    return len({_batch_norm_settings(b) for b in bns}) == 1 and len({_neuron_settings(n) for n in lifs}) == 1


def _batch_norm_settings(bn: nn.Module) -> tuple:
    counter = bn.num_batches_tracked if bn.momentum is None and bn.num_batches_tracked is not None else None
    return bn.eps, bn.momentum, bn.track_running_stats, None if counter is None else int(counter)


def _neuron_settings(lif: nn.Module) -> tuple:
    return lif.backend, float(lif.tau), float(lif.v_threshold), float(lif.surrogate_function.alpha)


def batch_norm_lif(y: torch.Tensor, bn, lif, channel_dim: int, kernels: str = "eager") -> torch.Tensor:
    """Spikes `[T, ...]` of `lif(bn(y))` through the fused function (callers check `can_fuse` first). A `y` that is
    a permuted dense tensor (channels-last images) runs as its contiguous view; the spikes keep `y`'s layout.

    `bn` and `lif` may also be equal-length sequences of sites whose channels lie side by side in y (the joint q, k,
    v projection): one BatchNorm kernel over all their channels computes each site's statistics as its own would."""
    bns, lifs = _sites(bn), _sites(lif)
    site_dim = channel_dim % y.dim()
    weight = torch.cat([b.weight for b in bns]) if len(bns) > 1 else bns[0].weight
    bias = torch.cat([b.bias for b in bns]) if len(bns) > 1 else bns[0].bias
    order = lif_kernels.dense_order(y)
    if order is None:
        spikes = FusedBatchNormLIF.apply(y, weight, bias, bns, lifs[0], channel_dim, kernels)
    else:
        channel_dim = order.index(channel_dim % y.dim())
        spikes = FusedBatchNormLIF.apply(y.permute(order), weight, bias, bns, lifs[0], channel_dim, kernels)
        spikes = spikes.permute(lif_kernels.inverse_order(order))
    if any(getattr(n, "record", False) for n in lifs):
        pieces = spikes.detach().split([b.num_features for b in bns], dim=site_dim)
        for n, piece in zip(lifs, pieces):
            if n.record:
                n.last_spikes = piece
    return spikes


__all__ = [
    "KERNELS", "FusedBatchNormLIF", "MaxPoolSpikes", "batch_norm_lif", "can_fuse", "can_pool_spikes", "max_pool_spikes",
]
