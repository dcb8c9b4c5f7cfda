"""The lean LIF against spikingjelly's LIFNode: spikes bit-equal, gradients equal, threshold ties included."""

from __future__ import annotations

import pytest
import torch

from spkprune.models import packing as neurons  # packing split from neurons.py; the tests below name it so
from spkprune.models.lif_kernels import lean_lif
from spkprune.models.neurons import ATTN_THRESHOLD, LIF, THRESHOLD
from spkprune.models.packing import pack_spikes


def _pair(threshold: float) -> tuple[LIF, LIF]:
    lean, plain = LIF(threshold), LIF(threshold)
    lean.backend, plain.backend = "lean", "spikingjelly"
    return lean, plain


def _inputs_with_ties(threshold: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 5, 7, generator=g) * 2 * threshold
    x[0, 0, 0] = 2 * threshold  # H_0 = X_0 / 2 lands exactly on the threshold: must fire (>=)
    x[0, 0, 3], x[1, 0, 3] = threshold, 1.5 * threshold  # H_0 = th/2, then H_1 = th/2 + (1.5 th - th/2)/2 = th
    x[:, 1, 4] = 0.0
    return x


@pytest.mark.parametrize("threshold", [THRESHOLD, ATTN_THRESHOLD])
@pytest.mark.parametrize("seed", [0, 1])
def test_lean_matches_spikingjelly_forward_and_backward(threshold, seed):
    lean, plain = _pair(threshold)
    x = _inputs_with_ties(threshold, seed)
    x_lean, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    s_lean, s_plain = lean(x_lean), plain(x_plain)
    assert s_lean.dtype == s_plain.dtype == torch.float32
    assert torch.equal(s_lean, s_plain)
    assert s_lean[0, 0, 0].all() and s_lean[1, 0, 3].all()  # the exact ties fired
    assert 0 < s_lean.mean() < 1
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 10))
    (s_lean * grad).sum().backward()
    (s_plain * grad).sum().backward()
    torch.testing.assert_close(x_lean.grad, x_plain.grad, atol=1e-6, rtol=0)
    assert x_lean.grad.abs().sum() > 0


def test_lean_gradient_flows_through_the_membrane_recurrence():
    x = torch.full((3, 1), 0.2, requires_grad=True)  # never fires: V carries over, dS_2/dX_0 = sg(H_2 - 1) / 8
    spikes = lean_lif(x)
    assert spikes.sum() == 0
    spikes[2].sum().backward()
    h2 = 0.2 * (1 - 0.5**3)  # H_t = 0.2 (1 - 2^-(t+1))
    sig = torch.sigmoid(torch.tensor(4.0 * (h2 - 1.0)))
    sg = float(4.0 * sig * (1 - sig))
    assert x.grad[2].item() == pytest.approx(sg / 2, rel=1e-6)
    assert x.grad[1].item() == pytest.approx(sg / 4, rel=1e-6)
    assert x.grad[0].item() == pytest.approx(sg / 8, rel=1e-6)


def test_reset_after_a_spike_blocks_the_recurrence():
    x = torch.tensor([[3.0], [0.5]], requires_grad=True)  # fires at t=0 (H=1.5), V resets to 0
    spikes = lean_lif(x)
    assert spikes.flatten().tolist() == [1.0, 0.0]
    spikes[1].sum().backward()
    assert x.grad[0].item() == 0.0  # detach_reset: nothing flows from step 1 into step 0 through the reset V


def test_every_call_starts_from_rest_and_records_spikes():
    for backend in ("lean", "spikingjelly"):
        lif = LIF()
        lif.backend, lif.record = backend, True
        x = torch.full((2, 4), 1.5)
        first, second = lif(x), lif(x)
        assert torch.equal(first, second) and first.flatten().tolist() == [0.0] * 4 + [1.0] * 4
        assert torch.equal(lif.last_spikes, second) and not lif.last_spikes.requires_grad


def test_unknown_backend_is_rejected():
    lif = LIF()
    lif.backend = "cuda-magic"
    with pytest.raises(ValueError, match="unknown LIF backend 'cuda-magic'"):
        lif(torch.zeros(2, 3))


def test_packed_spikes_give_the_same_gradients_and_are_saved_as_bool():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 16, generator=g) * 2
    weight = torch.randn(16, 5, generator=g, requires_grad=True)

    def run(packed: bool):
        weight.grad = None
        xx = x.clone().requires_grad_()
        if packed:
            with pack_spikes():
                out = lean_lif(xx).flatten(0, 1) @ weight
        else:
            out = lean_lif(xx).flatten(0, 1) @ weight
        out.square().sum().backward()
        return xx.grad, weight.grad.clone()

    gx_plain, gw_plain = run(False)
    gx_packed, gw_packed = run(True)
    assert torch.equal(gx_plain, gx_packed) and torch.equal(gw_plain, gw_packed)
    assert gw_plain.abs().sum() > 0


def test_pack_hook_stores_views_of_spikes_as_bool_and_leaves_other_tensors():
    with pack_spikes():
        spikes = lean_lif(torch.randn(3, 4, 6) * 2)
        view = spikes.flatten(0, 1).t()
        packed = neurons._pack(view)
        other = torch.randn(3)
        assert neurons._pack(other) is other
    assert packed[0].dtype == torch.bool and packed[0].numel() == spikes.numel()
    assert torch.equal(neurons._unpack(packed), view)
    assert neurons._pack(view) is view  # outside the context nothing is packed


def test_bool_to_converts_through_uint8_with_the_same_values_and_strides():
    g = torch.Generator().manual_seed(3)
    spikes = (torch.rand(4, 6, 5, generator=g) > 0.7).transpose(1, 2)  # a non-contiguous bool view
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
        converted = neurons.bool_to(spikes, dtype)
        assert converted.dtype == dtype and converted.shape == spikes.shape
        assert torch.equal(converted, spikes.to(dtype))
        assert converted.stride() == spikes.to(dtype).stride()  # _unpack reads the twin through its strides
    channels_last = (torch.rand(2, 3, 4, 5, generator=g) > 0.5).contiguous(memory_format=torch.channels_last)
    assert neurons.bool_to(channels_last, torch.float32).stride() == channels_last.stride()
    counts = torch.tensor([0.0, 2.0, 3.0])
    assert torch.equal(neurons.bool_to(counts, torch.uint8), torch.tensor([0, 2, 3], dtype=torch.uint8))
