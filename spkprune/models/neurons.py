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
    needed, the training kernels of `spkprune.models.fused` (compiled for each input shape, static; same spikes,
    gradients equal to the lean ones up to float rounding) on contiguous float32 input, else `"lean"`.
"""

from __future__ import annotations

import weakref

import torch
from spikingjelly.activation_based import neuron

TAU = 2.0
THRESHOLD = 1.0
ATTN_THRESHOLD = 0.5
SURROGATE_ALPHA = 4.0
BACKENDS = ("spikingjelly", "lean", "compiled")


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


def bool_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)`, for a bool `t` through its uint8 view: PyTorch's CPU kernel converts uint8 about 4x faster than
    bool (6.3 M spikes to float32: 0.66 ms against 2.5 ms), and True is stored as 1, so the values are the same."""
    return t.view(torch.uint8).to(dtype) if t.dtype == torch.bool else t.to(dtype)


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


# ---- spike packing: tensors saved for backward that share a spike map's memory are kept as bool -----------------------
# While `pack_spikes()` is active, every neuron output is registered as a spike map (and the residual stream, a sum of
# spike maps, as small integers); a saved-tensor hook then replaces any saved tensor that lives in such a tensor's
# memory (a view, or the `_unsafe_view` a matmul makes of its input) by a 1-byte twin (bool, or uint8) plus the
# geometry, so a Linear, Conv or matmul that keeps its input for the weight gradient keeps 1 byte per element instead
# of 4. A twin is made when a tensor in the map's memory is first saved (many maps are only read, never saved) and
# shared by every later save.
_SPIKE_REGISTRY: dict[int, list] | None = None
_NOT_PACKABLE = object()  # a registered map whose values do not fit its twin's dtype


def register_spikes(out: torch.Tensor, as_bool: torch.Tensor | None = None) -> None:
    """Inside `pack_spikes()`, let tensors saved for backward that live in the memory of the spike map `out` be kept
    as bool: `as_bool` when given (a bool copy the caller already has), else made from `out` on the first save."""
    registry = _SPIKE_REGISTRY
    if registry is None or not _packable(out):
        return
    _register(registry, out, torch.bool, as_bool)


def register_small_integers(out: torch.Tensor) -> None:
    """Like `register_spikes` for a map of small non-negative integers (the residual stream: sums of spike maps),
    kept as uint8; checked on the first save, so a map that is not one is simply not packed."""
    registry = _SPIKE_REGISTRY
    if registry is None or not _packable(out) or out.numel() == 0:
        return
    _register(registry, out, torch.uint8)


def packing_active() -> bool:
    """Whether tensors saved for backward are being packed (inside `pack_spikes()`)."""
    return _SPIKE_REGISTRY is not None


def _packable(out: torch.Tensor) -> bool:
    """A floating tensor that owns its whole storage, contiguous or channels-last (so the twin, made with the same
    memory format, has the same geometry)."""
    return (
        out.is_floating_point()
        and (out.is_contiguous() or (out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last)))
        and out.storage_offset() == 0
        and out.untyped_storage().nbytes() == out.numel() * out.element_size()
    )


def _register(registry: dict, out: torch.Tensor, dtype: torch.dtype, twin: torch.Tensor | None = None) -> None:
    key = out.untyped_storage().data_ptr()

    def forget(ref, key=key):
        if registry.get(key, (None,))[0] is ref:
            registry.pop(key, None)

    registry[key] = [weakref.ref(out, forget), dtype, twin]


def _twin(entry: list, owner: torch.Tensor):
    """The registered map's 1-byte copy, made on first use (or `_NOT_PACKABLE`)."""
    if entry[2] is None:
        with torch.no_grad():
            twin = owner.to(entry[1])
            if entry[1] is not torch.bool and not torch.equal(twin.to(owner.dtype), owner):
                twin = _NOT_PACKABLE  # negative, fractional or above 255
        entry[2] = twin
    return entry[2]


def _pack(t: torch.Tensor):
    if _SPIKE_REGISTRY is None or t.layout != torch.strided:
        return t
    entry = _SPIKE_REGISTRY.get(t.untyped_storage().data_ptr())
    owner = entry[0]() if entry is not None else None
    if owner is None or t.dtype != owner.dtype or t.untyped_storage().nbytes() != owner.untyped_storage().nbytes():
        return t
    twin = _twin(entry, owner)
    if twin is _NOT_PACKABLE:
        return t
    return (twin, t.dtype, t.shape, t.stride(), t.storage_offset())


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    twin, dtype, shape, stride, offset = packed
    return bool_to(twin, dtype).as_strided(shape, stride, offset)


class pack_spikes:
    """Context manager: inside it, spikes saved for the backward pass are stored as bool (exactly, spikes are 0/1)."""

    def __enter__(self):
        global _SPIKE_REGISTRY
        self._previous = _SPIKE_REGISTRY
        _SPIKE_REGISTRY = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        global _SPIKE_REGISTRY
        self._hooks.__exit__(*exc)
        _SPIKE_REGISTRY = self._previous
        return False


def lean_lif(x_seq: torch.Tensor, tau: float = TAU, threshold: float = THRESHOLD, alpha: float = SURROGATE_ALPHA):
    """Spikes `[T, ...]` of a LIF (hard reset to 0, detached reset, sigmoid surrogate) driven by `x_seq`."""
    return LeanLIF.apply(x_seq, float(tau), float(threshold), float(alpha))


def _lif_inference(x_seq: torch.Tensor, tau: float, threshold: float) -> torch.Tensor:
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
        _COMPILED_INFERENCE = torch.compile(_lif_inference, dynamic=True)
    return _COMPILED_INFERENCE(x_seq, float(tau), float(threshold))


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
                from spkprune.models import fused  # fused builds on this module

                return fused.compiled_lif(x_seq, self.tau, self.v_threshold, self.surrogate_function.alpha)
        return lean_lif(x_seq, self.tau, self.v_threshold, self.surrogate_function.alpha)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend}"


def dense_order(t: torch.Tensor) -> list[int] | None:
    """A permutation of `t`'s dimensions, keeping dimension 0 (time) first, under which `t` is contiguous, when `t`
    is not contiguous but is a permuted dense tensor (e.g. `[T, B, C, H, W]` from channels-last images); else None."""
    if t.is_contiguous() or t.dim() < 3:
        return None
    order = [0, *sorted(range(1, t.dim()), key=lambda d: -t.stride(d))]
    return order if t.permute(order).is_contiguous() else None


def inverse_order(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=order.__getitem__)


def lif_sites(module: torch.nn.Module) -> dict[str, LIF]:
    """Every LIF below `module`, by module path."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LIF)}
