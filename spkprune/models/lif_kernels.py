"""The LIF neuron's kernels: charge, fire and hard reset forward, the surrogate-gradient backward, eager and compiled.

The arithmetic of spikingjelly 2.0's multi-step LIF with the Spikformer settings (hard reset to 0, detached reset,
sigmoid surrogate, firing on `>=`), from a membrane potential of 0. `LIF` (`neurons`) and the fused BatchNorm + LIF
sites (`fused`) run on these functions; like spikingjelly's `functional` and `auto_cuda`, this module builds only on
the spike packing below it (`packing`) and never imports the modules that use it.

- eager, in place: `charge_in_place`, `surrogate_backward`, and `LeanLIF` (`lean_lif`) made of them;
- compiled inference: `lif_inference` through `torch.compile` (`compiled_lif_inference`, dynamic shapes);
- compiled training: the functional kernels of `compiled_kernel(name)` (static shapes) and `CompiledLIF`
  (`compiled_lif`) on them;
- layout: `dense_order` / `inverse_order` run these element-wise kernels on a permuted dense input as its contiguous
  view.
"""

from __future__ import annotations

import torch

from spkprune.models.packing import bool_to, register_spikes

TAU = 2.0
THRESHOLD = 1.0
SURROGATE_ALPHA = 4.0
_SHAPES_PER_KERNEL = 64  # site shapes (and last-batch variants) one process may compile each kernel for


# ---- eager, in place ---------------------------------------------------------------------------------------------


def charge_in_place(z: torch.Tensor, tau: float, threshold: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Write the charged potentials H of the input `z [T, ...]` into `out` (default: over `z` itself), step by step
    from V = 0, and return the spikes (bool). H = (X - V) / tau + V: spikingjelly's V + (X - (V - V_reset)) / tau with
    V_reset = 0, and IEEE addition commutes, so H is bit-identical to spikingjelly's."""
    out = z if out is None else out
    spikes = torch.empty(z.shape, dtype=torch.bool, device=z.device)
    v = torch.zeros_like(z[0])
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    for t in range(z.shape[0]):
        h = torch.sub(z[t], v, out=out[t])
        h.div_(tau).add_(v)
        torch.ge(h, threshold, out=spikes[t])
        torch.where(spikes[t], zero, h, out=v)  # hard reset to 0
    return spikes


def surrogate_backward(h_seq: torch.Tensor, grad_spikes: torch.Tensor, tau: float, threshold: float, alpha: float,
                       overwrite: bool = False) -> torch.Tensor:
    """dL/dX of the LIF from dL/dS and its potentials H `[T, ...]` (H is used as scratch space with `overwrite`).

    sg = (1 - s) * s * alpha with s = sigmoid(alpha * (H - V_th)) (spikingjelly's expression);
    dH_t = dS_t * sg_t + c_{t+1} * (1 - S_t) (the reset is detached), dX_t = dH_t / tau, c_t = dH_t - dH_t / tau."""
    fired = h_seq >= threshold
    s = (h_seq if overwrite else h_seq.clone()).sub_(threshold).mul_(alpha).sigmoid_()
    grad = torch.sub(1.0, s).mul_(s).mul_(alpha).mul_(grad_spikes)
    del s
    carry = None
    for t in range(grad.shape[0] - 1, -1, -1):
        g = grad[t]
        if carry is not None:
            g.add_(carry.masked_fill_(fired[t], 0.0))
        scaled = g / tau
        carry = g.sub_(scaled).clone() if t else None
        g.copy_(scaled)  # grad now holds dX for step t
    return grad


def backward_in_place(z, grad, tau: float, threshold: float, alpha: float):
    """dL/dz of the LIF from its input `z [T, ...]` and dL/dS, with `z` overwritten (by H, then scratch)."""
    charge_in_place(z, tau, threshold)
    return surrogate_backward(z, grad, tau, threshold, alpha, overwrite=True)


class LeanLIF(torch.autograd.Function):
    """Multi-step LIF with hard reset to 0 and a detached reset, from V = 0.

    Forward, per step: H = V + (X - V) / tau, S = (H >= V_th), V = H * (1 - S).
    Backward (sigmoid surrogate, sg(u) = alpha * sigmoid(alpha u) * (1 - sigmoid(alpha u)), u = H - V_th):
    dH_t = dS_t * sg(u_t) + c_{t+1} * (1 - S_t), dX_t = dH_t / tau, c_t = dH_t - dH_t / tau.
    Everything the backward needs is a function of H, so H (float32) is the only tensor saved.
    """

    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, tau: float, threshold: float, alpha: float) -> torch.Tensor:
        x = x_seq.float()
        h_seq = torch.empty_like(x, memory_format=torch.contiguous_format)
        spikes = charge_in_place(x, tau, threshold, out=h_seq)
        ctx.save_for_backward(h_seq)
        ctx.tau, ctx.threshold, ctx.alpha = tau, threshold, alpha
        ctx.input_dtype = x_seq.dtype
        out = bool_to(spikes, x_seq.dtype)
        register_spikes(out, spikes)
        return out

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        (h_seq,) = ctx.saved_tensors
        grad = surrogate_backward(h_seq, grad_spikes.float(), ctx.tau, ctx.threshold, ctx.alpha)
        return grad.to(ctx.input_dtype), None, None, None


def lean_lif(x_seq: torch.Tensor, tau: float = TAU, threshold: float = THRESHOLD, alpha: float = SURROGATE_ALPHA):
    """Spikes `[T, ...]` of a LIF (hard reset to 0, detached reset, sigmoid surrogate) driven by `x_seq`."""
    return LeanLIF.apply(x_seq, float(tau), float(threshold), float(alpha))


# ---- compiled inference ------------------------------------------------------------------------------------------


def lif_inference(x_seq: torch.Tensor, tau: float, threshold: float) -> torch.Tensor:
    # The same float operations, in the same order, as LeanLIF.forward; torch.compile fuses the loop into one kernel.
    # (Scaling by 1/tau = 0.5 is exact, so even a fused multiply-add gives the same H bit for bit.)
    v = torch.zeros_like(x_seq[0])
    spikes = []
    for t in range(x_seq.shape[0]):
        h = v + (x_seq[t] - v) / tau
        fired = h >= threshold
        spikes.append(fired.to(x_seq.dtype))
        v = torch.where(fired, torch.zeros_like(h), h)
    return torch.stack(spikes)


_COMPILED_INFERENCE = None


def compiled_lif_inference(x_seq: torch.Tensor, tau: float = TAU, threshold: float = THRESHOLD) -> torch.Tensor:
    """Spikes of `x_seq` without autograd, from a fused kernel (compiled once per process, any shape)."""
    global _COMPILED_INFERENCE
    if _COMPILED_INFERENCE is None:
        _COMPILED_INFERENCE = torch.compile(lif_inference, dynamic=True)
    return _COMPILED_INFERENCE(x_seq, float(tau), float(threshold))


# ---- compiled training: functional kernels for torch.compile -----------------------------------------------------

_COMPILED: dict[str, object] = {}


def compiled_kernel(name: str):
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


def _normalised_steps(y, mean, invstd, weight, bias, channel_dim: int) -> list:
    """BatchNorm's output for each step of `y`, formed as its CPU kernel forms it (a per-channel scale and shift),
    with every step viewed as `[outer, C, inner]`: all steps then share one loop nest in inductor's kernel (without
    it inductor wrote the normalised values of every step to memory first: 13 % slower on a `[4, 16, 64, 1536]`
    site)."""
    outer = 1
    for size in y.shape[1:channel_dim]:
        outer *= size
    y = y.reshape(y.shape[0], outer, y.shape[channel_dim], -1)
    mean, invstd, weight, bias = (t.view(1, -1, 1) for t in (mean, invstd, weight, bias))
    scale = invstd * weight
    shift = bias - mean * scale
    return [y[t] * scale + shift for t in range(y.shape[0])]


def _backward_from_input_functional(y, grad, mean, invstd, weight, bias, channel_dim: int, tau: float,
                                    threshold: float, alpha: float):
    """`_backward_functional` on the BatchNorm input: the normalised values are formed inside the same kernel instead
    of being recomputed to memory."""
    steps = _normalised_steps(y, mean, invstd, weight, bias, channel_dim)
    return _backward_functional(steps, grad.reshape(len(steps), *steps[0].shape), tau, threshold, alpha)


def _charge_from_input_functional(y, mean, invstd, weight, bias, channel_dim: int, tau: float, threshold: float):
    """The float spikes of `LIF(BatchNorm(y))` given BatchNorm's statistics, the normalised values formed inside the
    kernel: BatchNorm's output is never written to memory."""
    steps = _normalised_steps(y, mean, invstd, weight, bias, channel_dim)
    v = torch.zeros_like(steps[0])
    spikes = []
    for z in steps:
        h = v + (z - v) / tau  # the lean neuron's arithmetic (see lif_inference)
        fired = h >= threshold
        spikes.append(fired.to(y.dtype))
        v = torch.where(fired, torch.zeros_like(h), h)
    return torch.stack(spikes).view(y.shape)


def _charge_functional(z, tau: float, threshold: float):
    """The compiled inference neuron's arithmetic: float spikes (inductor's CPU code stores bool outputs about 7x
    slower than floats) in a new tensor. Written over `z` instead, inductor still fills a buffer of its own first and
    then copies it: twice the stores (an `[4, 16, 64, 1536]` site: 3.2 ms in place, 1.5 ms so)."""
    return lif_inference(z, tau, threshold)


_FUNCTIONAL = {
    "charge": _charge_functional,
    "backward": _backward_functional,
    "backward_from_input": _backward_from_input_functional,
    "charge_from_input": _charge_from_input_functional,
}


class CompiledLIF(torch.autograd.Function):
    """The LIF of a site without BatchNorm before it (the attention neuron) on the compiled training kernels: the
    forward charge as the fused sites run it, and the surrogate recursion in one kernel that recomputes the potentials
    from the input. Keeps the input, as `LeanLIF` keeps the potentials: the same bytes."""

    @staticmethod
    def forward(ctx, x, tau: float, threshold: float, alpha: float):
        spikes = compiled_kernel("charge")(x, tau, threshold)
        ctx.save_for_backward(x)
        ctx.settings = (tau, threshold, alpha)
        register_spikes(spikes)
        return spikes

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return compiled_kernel("backward")(x, grad.contiguous(), *ctx.settings), None, None, None


def compiled_lif(x: torch.Tensor, tau: float, threshold: float, alpha: float) -> torch.Tensor:
    """Spikes `[T, ...]` of a LIF driven by the contiguous float `x`, with gradients, through `CompiledLIF`."""
    return CompiledLIF.apply(x, float(tau), float(threshold), float(alpha))


# ---- layout ------------------------------------------------------------------------------------------------------


def dense_order(t: torch.Tensor) -> list[int] | None:
    """A permutation of `t`'s dimensions, keeping dimension 0 (time) first, under which `t` is contiguous, when `t`
    is not contiguous but is a permuted dense tensor (e.g. `[T, B, C, H, W]` from channels-last images); else None."""
    if t.is_contiguous() or t.dim() < 3:
        return None
    order = [0, *sorted(range(1, t.dim()), key=lambda d: -t.stride(d))]
    return order if t.permute(order).is_contiguous() else None


def inverse_order(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=order.__getitem__)
