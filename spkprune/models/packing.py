"""Spike maps in memory: bool to float conversion and the packing of spikes saved for the backward pass.

The bottom of the neuron stack: it imports nothing from spkprune, and the neuron kernels (`lif_kernels`), the `LIF`
module (`neurons`) and the fused sites (`fused`) build on it.

While `pack_spikes()` is active, every neuron output is registered as a spike map (and the residual stream, a sum of
spike maps, as small integers); a saved-tensor hook then replaces any saved tensor that lives in such a tensor's
memory (a view, or the `_unsafe_view` a matmul makes of its input) by a 1-byte twin (bool, or uint8) plus the
geometry, so a Linear, Conv or matmul that keeps its input for the weight gradient keeps 1 byte per element instead
of 4. A twin is made when a tensor in the map's memory is first saved (many maps are only read, never saved) and
shared by every later save.
"""

from __future__ import annotations

import weakref

import torch

_SPIKE_REGISTRY: dict[int, list] | None = None
_NOT_PACKABLE = object()  # a registered map whose values do not fit its twin's dtype


def bool_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)`, for a bool `t` through its uint8 view: PyTorch's CPU kernel converts uint8 about 4x faster than
    bool (6.3 M spikes to float32: 0.66 ms against 2.5 ms), and True is stored as 1, so the values are the same."""
    return t.view(torch.uint8).to(dtype) if t.dtype == torch.bool else t.to(dtype)


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
