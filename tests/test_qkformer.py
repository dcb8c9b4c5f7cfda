"""QKFormer: fidelity to the original code, checkpoint compatibility, presets, the pruning interface. The fixture
(tests/fixtures/qkformer-small/README.md) was made by running the original code."""

from __future__ import annotations


import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fixturekit
from spkprune.errors import SpkpruneError
from spkprune.models.qkformer import QKFormer, QKFormerConfig, SpikingSelfAttention
from spkprune.models import create_model, get_config, list_models
from spkprune.models.qkformer_presets import QKFORMER_PRESETS, original_kwargs

FIXTURES = fixturekit.ROOT / "qkformer-small"
GOLDEN = FIXTURES / "golden_small.safetensors"
ACTIVATIONS = FIXTURES / "golden_small_activations.safetensors"

# The fixture's constructor: the CIFAR-10 configuration with embed_dims=64, depths=3, T=2 (8 heads).
SMALL = dict(embed_dim=64, depth=3, timesteps=2)
# In the fixture the last stage's self-attention never fires (see test_every_spike_...).
SILENT_IN_FIXTURE = {"stage3.0.ssa.attn_lif", "stage3.0.ssa.proj_lif"}


def golden_state_dict() -> dict[str, torch.Tensor]:
    return fixturekit.golden_state_dict(FIXTURES)


def fixture_keys() -> list[tuple[str, list[int]]]:
    return fixturekit.fixture_keys(FIXTURES)


@pytest.fixture(scope="module")
def golden_model() -> QKFormer:
    model = create_model("qkformer-4-384-cifar10", **SMALL)
    model.load_state_dict(golden_state_dict(), strict=True)
    return model.eval()


def test_fixture_constructor_is_the_small_cifar_configuration():
    with safe_open(GOLDEN, "pt") as f:
        metadata = f.metadata()
    assert metadata == {"family": "qkformer", "constructor": str(dict(embed_dims=64, num_heads=8, depths=3, T=2))}
    cfg = get_config("qkformer-4-384-cifar10", **SMALL)
    expected = dict(img_size_h=32, img_size_w=32, patch_size=4, in_channels=3, num_classes=10, embed_dims=64,
                    num_heads=8, mlp_ratios=4, qkv_bias=False, depths=3, sr_ratios=1, T=2)  # the README's
    assert original_kwargs(cfg) == expected
    assert cfg.stage_dims == (16, 32, 64) and cfg.stage_depths == (1, 1, 1) and cfg.stage_tokens == (1024, 256, 64)


def test_state_dict_has_the_original_keys_shapes_and_order(golden_model):
    own = golden_model.state_dict()
    assert [(k, list(v.shape)) for k, v in own.items()] == fixture_keys()
    original = golden_state_dict()
    assert all(own[k].dtype == original[k].dtype for k in own)


def test_strict_load_rejects_a_foreign_state_dict_with_one_clear_error():
    state = golden_state_dict()
    state.pop("head.bias")
    state["stage1.0.tssa.q_conv.weight"] = torch.zeros(16, 16, 1, 1)  # a Conv2d's shape where the original has Conv1d
    with pytest.raises(SpkpruneError, match="mismatched shapes.*missing keys"):
        create_model("qkformer-4-384-cifar10", **SMALL).load_state_dict(state, strict=True)


def test_every_spike_and_the_logits_equal_the_original_code(golden_model):
    tensors = load_file(GOLDEN)
    logits, spikes = fixturekit.run_recording_spikes(golden_model, tensors["__input__"])
    expected = fixturekit.expected_spikes(FIXTURES)
    assert set(spikes) == set(expected) and len(spikes) == 28
    for name, fired in spikes.items():
        assert fired.shape == expected[name].shape, name
        assert torch.equal(fired, expected[name]), f"spikes differ at {name}"
    # The fixture's last-stage attention stays silent, so it checks that stage's q/k/v only; the arithmetic after
    # them was checked against the original code with livelier weights (docs/model-families.md).
    assert {name for name, spikes in expected.items() if not spikes.any()} == SILENT_IN_FIXTURE
    # Bit for bit: the same float32 operations in the same order as the original.
    assert torch.equal(logits, tensors["__logits__"])


def test_neuron_sites_follow_the_original_module_order(golden_model):
    with safe_open(ACTIVATIONS, "pt") as f:
        assert list(golden_model.neuron_sites()) == f.metadata()["sites_in_order"].split(",")


def test_forward_resets_neuron_state_so_repeated_calls_agree(golden_model):
    fixturekit.check_calls_are_independent(golden_model, load_file(GOLDEN)["__input__"])


def test_last_stage_proj_lif_runs_over_time_and_batch_as_the_original():
    # The original feeds proj_lif [T*B, C, N]: its membrane carries from one sample to the next. With a constant
    # drive of 1.5 (proj_bn weight 0) the neuron fires on every second step, so at T=1 the second sample of a batch
    # fires and the same sample alone does not.
    attention = SpikingSelfAttention(dim=16, num_heads=8).eval()
    with torch.no_grad():
        attention.proj_bn.weight.zero_()
        attention.proj_bn.bias.fill_(1.5)
        x = torch.rand(1, 2, 16, 2, 2)  # [T=1, B=2, C, H, W]
        together, alone = attention(x), attention(x[:, 1:])
    assert not together[0, 0].any() and together[0, 1].all()
    assert not alone.any()


# `sum(p.numel())` of the original code's model for each preset (computed by instantiating the original
# constructor with `original_kwargs(preset)`: equal state_dict keys, shapes and order). The original's logs print
# 6,706,234 (cifar10/cifar10_origin_log.txt), 1,504,138 (cifar10-dvs/cifar10-dvs_origin_log.txt), 64,962,760
# (imagenet/imagenet_origin_log.txt) and 16.47 M / 29.08 M / 64.96 M (imagenet/logs/QKFormer_*.txt).
PARAMETER_COUNTS = {
    "qkformer-4-384-cifar10": 6_706_234,
    "qkformer-4-384-cifar100": 6_740_884,
    "qkformer-2-256-cifar10dvs": 1_504_138,
    "qkformer-2-256-dvs128": 1_999_371,
    "qkformer-10-384-imagenet": 16_473_688,
    "qkformer-10-512-imagenet": 29_079_336,
    "qkformer-10-768-imagenet": 64_962_760,
    "qkformer-3-64-digits": 140_162,
}


def test_every_preset_has_a_parameter_count():
    assert sorted(PARAMETER_COUNTS) == list_models(family="qkformer")


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_match_the_original(name):
    with torch.device("meta"):  # shapes only: the big presets build in a fraction of a second
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]
    assert model.used_parameter_count() == PARAMETER_COUNTS[name]  # the original creates no unused parameter


def test_presets_follow_the_original_files():
    cifar = get_config("qkformer-4-384-cifar10")
    assert cifar == QKFormerConfig(32, 3, 10, 384, 8, 4, 4, 4, "cifar", "cifar10")
    assert cifar.stage_tokens == (1024, 256, 64) and cifar.stage_depths == (1, 1, 2)
    dvs, gesture = get_config("qkformer-2-256-cifar10dvs"), get_config("qkformer-2-256-dvs128")
    assert (dvs.img_size, dvs.in_channels, dvs.timesteps, dvs.num_heads, dvs.mlp_ratio) == (128, 2, 16, 16, 1)
    assert (gesture.num_classes, gesture.mlp_ratio, gesture.stage_tokens) == (11, 4, (256, 64))
    heads = {name: get_config(name).num_heads for name in list_models("*imagenet*", family="qkformer")}
    assert heads == {"qkformer-10-384-imagenet": 6, "qkformer-10-512-imagenet": 8, "qkformer-10-768-imagenet": 12}
    for name in heads:
        cfg = get_config(name)
        layout = (cfg.img_size, cfg.timesteps, cfg.stage_depths, cfg.stage_tokens)
        assert layout == (224, 4, (1, 2, 7), (3136, 784, 196)), name


def test_imagenet_layout_matches_the_16m_training_log():
    # Shapes and names as imagenet/logs/QKFormer_16M.txt prints the model.
    with torch.device("meta"):
        state = create_model("qkformer-10-384-imagenet").state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["patch_embed1.proj_conv.weight"] == (48, 3, 3, 3)
    assert shapes["patch_embed1.proj2_conv.weight"] == (96, 96, 3, 3)
    assert shapes["patch_embed1.proj_res_conv.weight"] == (96, 48, 1, 1)
    assert shapes["patch_embed3.proj3_conv.weight"] == (384, 192, 3, 3)
    assert shapes["stage1.0.tssa.q_conv.weight"] == (96, 96, 1)
    assert shapes["stage2.1.mlp.fc1_conv.weight"] == (768, 192, 1, 1)
    assert shapes["stage3.6.attn.proj_conv.weight"] == (384, 384, 1) and "stage3.7.attn.q_conv.weight" not in shapes
    top = list(dict.fromkeys(k.split(".")[0] for k in state))
    assert top == ["patch_embed1", "patch_embed2", "patch_embed3", "stage1", "stage2", "stage3", "head"]


def test_dvs_layout_orders_the_state_dict_stage_by_stage():
    with torch.device("meta"):
        model = create_model("qkformer-2-256-cifar10dvs")
    state = model.state_dict()
    assert list(dict.fromkeys(k.split(".")[0] for k in state)) == ["patch_embed1", "stage1", "patch_embed2", "stage2",
                                                                  "head"]
    assert tuple(state["patch_embed1.proj_res_conv.weight"].shape) == (128, 32, 1, 1)  # from proj1, stride 4
    assert tuple(state["patch_embed2.proj_conv.weight"].shape) == (256, 128, 3, 3)
    assert tuple(state["stage2.0.ssa.v_conv.weight"].shape) == (256, 256, 1)
    assert model.patch_embed1.proj_res_conv.stride == (4, 4)


def test_digits_preset_runs_on_8x8_digits():
    model = create_model("qkformer-3-64-digits").eval()
    assert model.stage_tokens == (64, 16, 4) and model.num_tokens == 4 and model.token_dim == 64
    with torch.no_grad():
        logits = model(torch.rand(5, 1, 8, 8))
    assert logits.shape == (5, 10)


def test_event_frames_keep_their_time_steps():
    model = create_model("qkformer-2-256-dvs128", embed_dim=64, img_size=32)
    site = model.neuron_sites()["stage1.0.tssa.attn_lif"]
    site.record = True
    frames = (torch.rand(2, 3, 2, 32, 32) < 0.3).float()
    with torch.no_grad():  # training mode: batch statistics
        logits = model(frames)
    site.record = False
    assert logits.shape == (2, 11)
    assert site.last_spikes.shape == (3, 2, 16, 1, 16)  # T from the frames; 16 heads; 4x4 tokens


def test_input_of_the_wrong_shape_is_refused_with_the_expected_shape():
    model = create_model("qkformer-3-64-digits")
    with pytest.raises(SpkpruneError, match=r"expects images \[B,1,8,8\]"):
        model(torch.rand(2, 3, 8, 8))


def test_prunable_weights_are_every_conv_and_linear_weight():
    model = create_model("qkformer-3-64-digits")
    prunable = model.prunable_weights()
    # 3 + 3 + 3 embedding convs; q k proj + 2 MLP per token block (x2); q k v proj + 2 MLP; head
    assert len(prunable) == 9 + 2 * 5 + 6 + 1
    assert "stage3.0.ssa.v_conv.weight" in prunable and "head.weight" in prunable
    assert not any("bn" in k or k.endswith("bias") for k in prunable)
    state = model.state_dict()
    assert all(state[key].data_ptr() == param.data_ptr() for key, param in prunable.items())


def test_neuron_sites_have_the_original_settings():
    sites = create_model("qkformer-3-64-digits").neuron_sites()
    assert len(sites) == 9 + 2 * 6 + 7  # 3 per embedding; q k attn proj + 2 MLP per token block; + v
    assert {n for n, s in sites.items() if s.v_threshold == 0.5} == {n for n in sites if n.endswith("attn_lif")}
    assert all(s.v_threshold == 1.0 for n, s in sites.items() if not n.endswith("attn_lif"))
    assert all(s.tau == 2.0 and s.detach_reset and s.v_reset == 0.0 for s in sites.values())


def test_config_errors_name_the_problem():
    with pytest.raises(SpkpruneError, match="variant"):
        get_config("qkformer-3-64-digits", variant="swin")
    with pytest.raises(SpkpruneError, match="depth 4 does not fit the dvs stages"):
        get_config("qkformer-2-256-dvs128", depth=4)
    with pytest.raises(SpkpruneError, match="depth 2 does not fit the imagenet stages"):
        get_config("qkformer-10-384-imagenet", depth=2)
    with pytest.raises(SpkpruneError, match="img_size 120 must be divisible by 16"):
        get_config("qkformer-2-256-dvs128", img_size=120)
    with pytest.raises(SpkpruneError, match="embed_dim 200 must be divisible by 16"):
        get_config("qkformer-2-256-dvs128", embed_dim=200)
    with pytest.raises(SpkpruneError, match="not divisible by num_heads 12"):
        get_config("qkformer-3-64-digits", num_heads=12)
    with pytest.raises(SpkpruneError, match="unknown option"):
        get_config("qkformer-3-64-digits", depths=3)
    with pytest.raises(SpkpruneError, match="unknown preset 'qkformer-8-512-cifar10'"):
        create_model("qkformer-8-512-cifar10")


def test_config_round_trips_through_a_dict():
    for name, cfg in QKFORMER_PRESETS.items():
        assert QKFormerConfig.from_dict(cfg.to_dict()) == cfg, name
