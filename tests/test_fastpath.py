"""Fast paths keep the model's spikes: neuron backends on the original-code fixture, folded BatchNorm, spike packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import spkprune
from spkprune.errors import SpkpruneError
from spkprune.models import fastpath

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "spikformer-small"
SMALL = dict(embed_dim=64, num_heads=4, depth=1, timesteps=2)


@pytest.fixture(scope="module")
def golden():
    tensors = load_file(FIXTURES / "golden_small.safetensors")
    activations = load_file(FIXTURES / "golden_small_activations.safetensors")
    model = spkprune.create_model("spikformer-4-384-cifar10", **SMALL)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("__")})
    return model.eval(), tensors, activations


def _spikes_and_logits(model, x):
    sites = fastpath._sites(model)
    for site in sites.values():
        site.record = True
    with torch.inference_mode():
        logits = model(x)
    spikes = {name: site.last_spikes.to(torch.uint8) for name, site in sites.items()}
    for site in sites.values():
        site.record, site.last_spikes = False, None
    return spikes, logits


@pytest.mark.parametrize("path", ["spikingjelly", "lean", "folded"])
def test_every_path_reproduces_the_original_code_on_the_fixture(golden, path):
    model, tensors, activations = golden
    if path == "folded":
        net = fastpath.prepare_for_inference(model)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    else:
        net = fastpath.set_neuron_backend(model, path)
    spikes, logits = _spikes_and_logits(net, tensors["__input__"])
    fastpath.set_neuron_backend(model, "lean")
    assert len(spikes) == 12
    for name, value in spikes.items():
        assert torch.equal(value, activations[f"__spikes__.{name}"]), f"{path}: spikes differ at {name}"
    torch.testing.assert_close(logits, tensors["__logits__"], atol=1e-5, rtol=0)


def _with_random_batchnorm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


VARIANTS = [  # (preset, overrides, input shape): one small model of each variant
    ("spikformer-2-64-digits", {}, (64, 1, 8, 8)),
    ("spikformer-8-384-imagenet", dict(img_size=32, embed_dim=64, num_heads=4, depth=1, timesteps=2), (4, 3, 32, 32)),
    ("spikformer-2-256-cifar10dvs", dict(img_size=32, embed_dim=64, num_heads=4, depth=1, timesteps=2),
     (4, 2, 2, 32, 32)),
]


def _random_model_and_input(preset, overrides, shape):
    torch.manual_seed(0)
    model = _with_random_batchnorm(spkprune.create_model(preset, **overrides))
    return model, torch.rand(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset,overrides,shape", VARIANTS)
def test_folded_batchnorm_keeps_every_spike(preset, overrides, shape):
    model, x = _random_model_and_input(preset, overrides, shape)
    folded = fastpath.fold_batchnorm(model)
    mismatches = fastpath.spike_mismatches(model, folded, x)
    assert mismatches and sum(mismatches.values()) == 0, mismatches
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched


def test_folding_keeps_gathered_token_selection():
    from spkprune.models.selector import attach_selectors

    torch.manual_seed(0)
    model = _with_random_batchnorm(attach_selectors(spkprune.create_model("spikformer-2-64-digits"), {"keep": 0.5}))
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    folded = fastpath.prepare_for_inference(model)
    torch.manual_seed(5)
    reference_spikes, reference = _spikes_and_logits(model, x)
    torch.manual_seed(5)
    spikes, logits = _spikes_and_logits(folded, x)
    assert all(torch.equal(spikes[k], v) for k, v in reference_spikes.items())
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_fold_bn_into_is_exact_in_float64():
    layer, bn = torch.nn.Linear(3, 4).double(), torch.nn.BatchNorm1d(4).double()
    _with_random_batchnorm(bn)
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = bn(layer(x))
    fastpath.fold_bn_into(layer, bn)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("preset", ["spikformer-2-64-digits", "spikformer-2-256-dvs128"])
def test_training_fast_path_gives_the_plain_spikes_and_gradients(preset):
    """Fused BatchNorm + lean LIF (training mode) against separate BatchNorms + spikingjelly's LIF."""
    torch.manual_seed(0)
    plain = spkprune.create_model(preset, **({} if "digits" in preset else dict(img_size=32, timesteps=2))).train()
    fast = spkprune.create_model(preset, **({} if "digits" in preset else dict(img_size=32, timesteps=2))).train()
    fast.load_state_dict(plain.state_dict())
    fastpath.prepare_for_training(plain, backend="spikingjelly", pack_spikes=False)
    net = fastpath.prepare_for_training(fast)
    assert fastpath.neuron_backends(fast) == {"lean"} and fastpath.neuron_backends(plain) == {"spikingjelly"}
    assert {m.fuse_bn_lif for m in fast.modules() if hasattr(m, "fuse_bn_lif")} == {"eager"}
    cfg = plain.config
    g = torch.Generator().manual_seed(1)
    shape = (8, cfg.in_channels, cfg.img_size, cfg.img_size)
    x = torch.rand(8, cfg.timesteps, *shape[1:], generator=g) if cfg.variant == "dvs" else torch.rand(shape, generator=g)
    y = torch.arange(8) % cfg.num_classes
    for model in (plain, fast):
        for site in model.neuron_sites().values():
            site.record = True
    for model in (plain, net):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    fast_sites = fast.neuron_sites()
    for name, site in plain.neuron_sites().items():
        assert torch.equal(site.last_spikes, fast_sites[name].last_spikes), name
    scale = max(float(p.grad.abs().max()) for p in plain.parameters() if p.grad is not None)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        # The batch statistics are summed in another order than PyTorch's kernel: equal up to float rounding.
        torch.testing.assert_close(q.grad, p.grad, atol=2e-6 * scale, rtol=1e-4, msg=name)
    fast_buffers = dict(fast.named_buffers())
    for name, buf in plain.named_buffers():  # BatchNorm running statistics and batch counters
        torch.testing.assert_close(fast_buffers[name], buf, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
@pytest.mark.parametrize("layout", ["tokens", "conv", "channels-last conv"])
def test_fused_batchnorm_lif_matches_the_separate_modules(kernels, layout):
    from spkprune.models.fused import batch_norm_lif
    from spkprune.models.neurons import LIF

    g = torch.Generator().manual_seed(3)
    T, C = 3, 6
    shape, channel_dim = ((T, 20, C), -1) if layout == "tokens" else ((T, 4, C, 5, 5), 2)
    y = torch.randn(shape, generator=g) * 2 + 0.5
    if layout == "channels-last conv":  # [T, B, C, H, W] laid out as [T, B, H, W, C], as channels-last images are
        y = y.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    y.requires_grad_(True)
    grad = torch.randn(shape, generator=g)
    bn_ref, bn_fused = torch.nn.BatchNorm1d(C), torch.nn.BatchNorm1d(C)
    with torch.no_grad():
        bn_ref.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn_ref.bias.copy_(torch.randn(C, generator=g))
    bn_fused.load_state_dict(bn_ref.state_dict())
    lif = LIF()
    rows = y.movedim(channel_dim, -1)
    normed = bn_ref(rows.reshape(-1, C)).reshape(rows.shape).movedim(-1, channel_dim)
    expected = lif(normed)
    expected.backward(grad)
    expected_grads = [t.grad.clone() for t in (y, bn_ref.weight, bn_ref.bias)]
    y.grad = None
    spikes = batch_norm_lif(y, bn_fused, lif, channel_dim, kernels)
    spikes.backward(grad)
    assert torch.equal(spikes, expected)
    assert spikes.stride() == y.stride()  # the spikes keep the input's layout
    for got, want in zip((y.grad, bn_fused.weight.grad, bn_fused.bias.grad), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn_fused, name), getattr(bn_ref, name), atol=1e-6, rtol=1e-5)


def test_fused_site_keeps_only_the_batchnorm_input_for_backward():
    """What one conv/linear -> BN -> LIF site holds between forward and backward, in bytes of saved tensors."""
    from spkprune.models.fused import batch_norm_lif
    from spkprune.models.lif_kernels import lean_lif
    from spkprune.models.neurons import LIF

    y = torch.randn(4, 256, 32, requires_grad=True)
    bn = torch.nn.BatchNorm1d(32)

    def saved_bytes(fn) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(sizes)

    separate = saved_bytes(lambda: lean_lif(bn(y.reshape(-1, 32)).reshape(y.shape)))
    fused = saved_bytes(lambda: batch_norm_lif(y, bn, LIF(), -1))
    assert fused < 4 * y.numel() + 1024  # Y itself plus per-channel statistics (weight and bias are parameters)
    assert separate >= 2 * 4 * y.numel()  # BatchNorm's input and the neuron's potentials


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_spike_max_pool_keeps_only_its_indices_and_gives_the_module_gradient(memory_format):
    from spkprune.models import packing as neurons  # packing split from neurons.py; the test below names it so
    from spkprune.models.fused import can_pool_spikes, max_pool_spikes
    from spkprune.models.packing import pack_spikes

    g = torch.Generator().manual_seed(4)
    spikes = (torch.rand(6, 5, 9, 9, generator=g) < 0.3).float().contiguous(memory_format=memory_format)
    upstream = torch.randn(6, 5, 5, 5, generator=g)
    pool = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    results = []
    for fn in (pool, lambda x: max_pool_spikes(x, pool)):
        x = spikes.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(x)
        (out * upstream).sum().backward()
        results.append((out.detach(), x.grad, saved))
    (reference, reference_grad, _), (pooled, grad, saved) = results
    assert can_pool_spikes(pool, spikes.requires_grad_())
    assert not can_pool_spikes(torch.nn.MaxPool2d(3, ceil_mode=True), spikes)
    assert torch.equal(pooled, reference) and torch.equal(grad, reference_grad) and grad.abs().sum() > 0
    assert grad.is_contiguous(memory_format=memory_format)
    assert [t.dtype for t in saved] == [torch.int64]  # the indices; the module also keeps its input

    with pack_spikes():  # the pooled spikes are registered: a layer that saves them keeps them as bool
        pooled = max_pool_spikes(spikes.clone().requires_grad_(), pool)
        twin, dtype, shape, *_ = neurons._pack(pooled)
    assert twin.dtype == torch.bool and dtype == torch.float32 and torch.equal(twin.float(), reference)


def test_joint_qkv_projection_runs_one_fused_site_per_block(monkeypatch):
    """On the training fast path q, k and v come from one product and one fused site over 3C channels."""
    from spkprune.models import fused

    widths = []
    real = fused.FusedBatchNormLIF.apply
    monkeypatch.setattr(fused.FusedBatchNormLIF, "apply", lambda y, w, *a: widths.append(w.numel()) or real(y, w, *a))
    torch.manual_seed(0)
    model = fastpath.prepare_for_training(spkprune.create_model("spikformer-2-64-digits").train())
    model(torch.rand(4, 1, 8, 8)).sum().backward()
    dim, depth = model.config.embed_dim, model.config.depth
    assert widths.count(3 * dim) == depth
    assert widths[-4 * depth:] == [3 * dim, dim, model.config.mlp_ratio * dim, dim] * depth
    qkv = [p for n, p in model.named_parameters() if n.split(".")[-2].startswith(("q_", "k_", "v_"))]
    assert len(qkv) == 12 * depth and all(p.grad is not None and p.grad.abs().sum() > 0 for p in qkv)


def test_fused_kernels_are_checked():
    with pytest.raises(SpkpruneError, match="unknown fused kernels 'fast'"):
        fastpath.set_fused_bn_lif(spkprune.create_model("spikformer-2-64-digits"), "fast")


def test_spike_packing_hooks_can_be_switched_off():
    model = spkprune.create_model("spikformer-2-64-digits")
    fastpath.enable_spike_packing(model)
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    fastpath.enable_spike_packing(model, False)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_unknown_backend_is_a_user_error():
    with pytest.raises(SpkpruneError, match="unknown neuron backend 'fast'; choose one of: spikingjelly, lean"):
        fastpath.set_neuron_backend(spkprune.create_model("spikformer-2-64-digits"), "fast")


def test_compiled_neurons_give_the_fixture_spikes_exactly():
    """`prepare_for_inference(compile=True)`: every neuron runs one fused torch.compile kernel; same spikes, logits."""
    from pathlib import Path

    from safetensors.torch import load_file

    import spkprune
    from spkprune.models.fastpath import prepare_for_inference

    fixtures = Path(__file__).resolve().parent / "fixtures" / "spikformer-small"
    golden = load_file(fixtures / "golden_small.safetensors")
    activations = load_file(fixtures / "golden_small_activations.safetensors")
    model = spkprune.create_model("spikformer-4-384-cifar10", embed_dim=64, num_heads=4, depth=1, timesteps=2)
    model.load_state_dict({k: v for k, v in golden.items() if not k.startswith("__")})
    fast = prepare_for_inference(model, compile=True)
    sites = fast.neuron_sites()
    assert {site.backend for site in sites.values()} == {"compiled"}
    for site in sites.values():
        site.record = True
    with torch.inference_mode():
        logits = fast(golden["__input__"])
    for name, site in sites.items():
        assert torch.equal(site.last_spikes.to(torch.uint8), activations[f"__spikes__.{name}"]), name
    torch.testing.assert_close(logits, golden["__logits__"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_compiled_backend_trains_like_the_lean_one(layout):
    """With gradients the compiled backend runs the compiled training kernels (a permuted input as its contiguous
    view): the same spikes as the lean neuron and, up to float rounding, the same gradients."""
    from spkprune.models.neurons import LIF

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 5, 6, generator=g) * 2
    upstream = torch.randn(3, 4, 5, 6, generator=g)
    results = {}
    for backend in ("compiled", "lean"):
        x = base.clone().requires_grad_()
        site = LIF(0.5)
        site.backend = backend
        spikes = site(x if layout == "contiguous" else x.transpose(2, 3))
        (spikes * (upstream if layout == "contiguous" else upstream.transpose(2, 3))).sum().backward()
        results[backend] = (spikes.detach(), x.grad)
    assert torch.equal(results["compiled"][0], results["lean"][0]) and results["lean"][0].any()
    torch.testing.assert_close(results["compiled"][1], results["lean"][1], atol=1e-6, rtol=1e-5)
    assert results["lean"][1].abs().sum() > 0


@pytest.mark.parametrize("preset,overrides,shape", VARIANTS)
def test_channels_last_patch_splitting_keeps_every_spike(preset, overrides, shape):
    model, x = _random_model_and_input(preset, overrides, shape)
    nhwc = fastpath.set_channels_last(fastpath._copy_without_graph(model))
    assert nhwc.patch_embed.channels_last and not model.patch_embed.channels_last
    assert sum(fastpath.spike_mismatches(model, nhwc, x).values()) == 0
    site = nhwc.patch_embed.proj_lif1
    site.record = True
    with torch.inference_mode():
        nhwc(x)
    assert site.last_spikes.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


def test_channels_last_training_packs_the_same_saved_spikes(monkeypatch):
    """With channels-last images every spike map saved for backward is still kept as bool (or uint8)."""
    from spkprune.models import packing as neurons  # packing split from neurons.py; the test below names it so

    def packed_bytes(channels_last: bool) -> tuple[int, int]:
        torch.manual_seed(0)
        model = fastpath.prepare_for_training(spkprune.create_model("spikformer-2-64-digits").train(),
                                              channels_last=channels_last)
        counts = [0, 0]
        original = neurons._pack

        def counting(t):
            packed = original(t)
            counts[isinstance(packed, tuple)] += t.numel() * t.element_size()
            return packed

        monkeypatch.setattr(neurons, "_pack", counting)
        model(torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))).sum().backward()
        monkeypatch.setattr(neurons, "_pack", original)
        return tuple(counts)

    nchw, nhwc = packed_bytes(False), packed_bytes(True)
    assert nhwc[1] == nchw[1] > 0  # the same float bytes are packed
    assert nhwc[0] <= nchw[0]  # and no more stay float


def test_dense_order_finds_the_contiguous_view():
    from spkprune.models.lif_kernels import dense_order, inverse_order

    images = torch.rand(2, 3, 4, 5, 6)
    assert dense_order(images) is None
    nhwc = images.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(2, 3, 4, 5, 6)
    order = dense_order(nhwc)
    assert order == [0, 1, 3, 4, 2] and nhwc.permute(order).is_contiguous()
    assert torch.equal(nhwc.permute(order).permute(inverse_order(order)), images)
    assert dense_order(images[:, :, ::2]) is None  # not dense: no permutation makes it contiguous


def test_chunked_inference_gives_the_whole_batch_logits():
    torch.manual_seed(0)
    model = _with_random_batchnorm(spkprune.create_model("spikformer-2-64-digits"))
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = fastpath.prepare_for_inference(model, chunk_bytes=None)
    per_sample = model.activation_bytes_per_sample()
    assert per_sample == 4 * 4 * 64 * 8 * 8  # T=4 steps of the 64-channel stage at 8x8 (before its max-pool)
    chunked = fastpath.prepare_for_inference(model, chunk_bytes=16 * per_sample)
    calls = []
    chunked.patch_embed.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[1]))
    with torch.inference_mode():
        expected, got = whole(x), chunked(x)
    assert calls == [16, 16, 8]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    with torch.no_grad():  # recorded spikes keep the whole batch: no chunking while a site records
        chunked.patch_embed.proj_lif.record = True
        calls.clear()
        chunked(x)
    assert calls == [40]
