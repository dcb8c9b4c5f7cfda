"""BatchNorm (training mode) and a LIF neuron fused into one autograd function: the training fast path.

Every projection of a Spikformer is `conv/linear -> BatchNorm -> LIF`. Run as separate modules in training, the
BatchNorm keeps its input Y for the backward pass, the neuron keeps its charged potential H, and both allocate their
outputs and gradients. `FusedBatchNormLIF` keeps only Y (and the per-channel statistics): in the backward pass it
recomputes the normalised input and the membrane potentials from Y (cheap element-wise work), then runs the LIF's
surrogate-gradient recursion and BatchNorm's backward in one go. That halves the float tensors held per neuron site.

The arithmetic is BatchNorm's (biased batch variance to normalise, unbiased for the running variance, the module's
momentum and eps) and the lean LIF's (tau, hard reset to 0, detached reset, sigmoid surrogate). Float rounding of the
batch statistics differs from PyTorch's kernel in the last bits, so a pre-activation within an ulp of the threshold can
fire on one path and not on the other; `tests/test_fastpath.py` bounds that and compares gradients.

Two kernel sets compute the same thing: "eager" (in-place tensor code, at most three full-size temporaries) and
"compiled" (functional code fused by `torch.compile` into a few loops; a one-off compile of about 10 s per layout in a
process). Their results agree to float rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from spkprune.models import neurons

KERNELS = ("eager", "compiled")
_COMPILED: dict[str, object] = {}


def _kernel(name: str, kernels: str):
    if kernels == "eager":
        return _EAGER[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_FUNCTIONAL[name], dynamic=True)
    return _COMPILED[name]


def _count(y: torch.Tensor, dims: list[int]) -> int:
    count = 1
    for d in dims:
        count *= y.shape[d]
    return count


# ---- eager kernels: in place, at most three full-size temporaries --------------------------------------------------


def _charge_in_place(z: torch.Tensor, tau: float, threshold: float, spikes: torch.Tensor | None = None) -> None:
    """Overwrite `z [T, ...]` (the LIF input) with the charged potentials H, step by step (the lean LIF's order of
    operations); write the spikes into `spikes` when given."""
    v = torch.zeros_like(z[0])
    for t in range(z.shape[0]):
        h = z[t]
        h.sub_(v).div_(tau).add_(v)
        fired = torch.ge(h, threshold, out=spikes[t]) if spikes is not None else h >= threshold
        v.copy_(h).masked_fill_(fired, 0.0)


def _forward_eager(y, weight, bias, eps: float, tau: float, threshold: float, dims: list[int]):
    var, mean = torch.var_mean(y, dims, correction=0, keepdim=True)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight
    z = torch.addcmul(bias - mean * scale, y, scale)
    spikes = torch.empty(z.shape, dtype=torch.bool, device=z.device)
    _charge_in_place(z, tau, threshold, spikes)
    return spikes, mean, var, invstd


def _backward_eager(grad, y, mean, invstd, weight, bias, tau: float, threshold: float, alpha: float,
                    dims: list[int]):
    scale = invstd * weight
    h = torch.addcmul(bias - mean * scale, y, scale)
    _charge_in_place(h, tau, threshold)
    s = torch.sub(h, threshold).mul_(alpha).sigmoid_()
    grad_z = torch.sub(1.0, s).mul_(s).mul_(alpha).mul_(grad)  # dS * sg(H - V_th)
    del s
    carry = None
    for t in range(h.shape[0] - 1, -1, -1):
        gz = grad_z[t]
        if carry is not None:
            gz.add_(carry.masked_fill_(h[t] >= threshold, 0.0))  # the reset is detached: dV/dH = 1 - S
        scaled = gz / tau
        carry = gz.sub_(scaled).clone() if t else None
        gz.copy_(scaled)
    xhat = torch.sub(y, mean, out=h).mul_(invstd)  # H is no longer needed
    count = _count(y, dims)
    grad_bias = grad_z.sum(dims, keepdim=True)
    grad_weight = (grad_z * xhat).sum(dims, keepdim=True)
    grad_z.sub_(grad_bias / count).sub_(xhat.mul_(grad_weight / count)).mul_(scale)
    return grad_z, grad_weight, grad_bias


# ---- functional kernels, for torch.compile --------------------------------------------------------------------------


def _forward_functional(y, weight, bias, eps: float, tau: float, threshold: float, dims: list[int]):
    """Spikes (bool) of the LIF driven by BatchNorm(y) with batch statistics over `dims`; mean, biased var, 1/std."""
    var, mean = torch.var_mean(y, dims, correction=0, keepdim=True)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight
    z = y * scale + (bias - mean * scale)
    v = torch.zeros_like(z[0])
    spikes = []
    for t in range(z.shape[0]):
        h = (z[t] - v) / tau + v
        fired = h >= threshold
        spikes.append(fired)
        v = torch.where(fired, torch.zeros_like(h), h)
    return torch.stack(spikes), mean, var, invstd


def _backward_functional(grad, y, mean, invstd, weight, bias, tau: float, threshold: float, alpha: float,
                         dims: list[int]):
    """Gradients with respect to y, the BatchNorm weight and bias (the latter two still broadcast-shaped)."""
    scale = invstd * weight
    z = y * scale + (bias - mean * scale)
    v = torch.zeros_like(z[0])
    potentials = []
    for t in range(z.shape[0]):
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
    grad_z = torch.stack(grad_z)
    xhat = (y - mean) * invstd
    count = _count(y, dims)
    grad_bias = grad_z.sum(dims, keepdim=True)
    grad_weight = (grad_z * xhat).sum(dims, keepdim=True)
    grad_y = (grad_z - grad_bias / count - xhat * (grad_weight / count)) * scale
    return grad_y, grad_weight, grad_bias


_EAGER = {"forward": _forward_eager, "backward": _backward_eager}
_FUNCTIONAL = {"forward": _forward_functional, "backward": _backward_functional}


class FusedBatchNormLIF(torch.autograd.Function):
    """`LIF(BatchNorm(y))` in training mode for `y: [T, ...]` whose channels lie at `channel_dim` (of y)."""

    @staticmethod
    def forward(ctx, y, weight, bias, bn: nn.Module, lif: nn.Module, channel_dim: int, kernels: str):
        channel_dim = channel_dim % y.dim()
        dims = [d for d in range(y.dim()) if d != channel_dim]
        shape = [1] * y.dim()
        shape[channel_dim] = y.shape[channel_dim]
        w, b = weight.detach().view(shape), bias.detach().view(shape)
        tau, threshold = float(lif.tau), float(lif.v_threshold)
        spikes, mean, var, invstd = _kernel("forward", kernels)(y, w, b, float(bn.eps), tau, threshold, dims)
        _update_running_stats(bn, mean.flatten(), var.flatten(), y.numel() // y.shape[channel_dim])
        ctx.save_for_backward(y, mean, invstd, w, b)
        ctx.settings = (tau, threshold, float(lif.surrogate_function.alpha), dims, kernels)
        out = spikes.to(y.dtype)
        neurons.register_spikes(out, spikes)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, mean, invstd, w, b = ctx.saved_tensors
        tau, threshold, alpha, dims, kernels = ctx.settings
        backward = _kernel("backward", kernels)
        grad_y, grad_w, grad_b = backward(grad.contiguous(), y, mean, invstd, w, b, tau, threshold, alpha, dims)
        return grad_y, grad_w.flatten(), grad_b.flatten(), None, None, None, None


@torch.no_grad()
def _update_running_stats(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    if not bn.track_running_stats or bn.running_mean is None:
        return
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
    unbiased = var * (count / max(count - 1, 1))
    bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)


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
    """Spikes `[T, ...]` of `lif(bn(y))` through the fused function (callers check `can_fuse` first)."""
    spikes = FusedBatchNormLIF.apply(y, bn.weight, bn.bias, bn, lif, channel_dim, kernels)
    if getattr(lif, "record", False):
        lif.last_spikes = spikes.detach()
    return spikes


__all__ = ["KERNELS", "FusedBatchNormLIF", "batch_norm_lif", "can_fuse"]
