"""The Spike-driven Transformer (V1): fidelity to the original code, checkpoint compatibility, presets, the pruning
interface. The fixture (tests/fixtures/sdt-small/README.md) was made by running the original code."""

from __future__ import annotations


import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fixturekit
from spkprune.errors import SpkpruneError
from spkprune.models.sdt import SDTConfig, SpikeDrivenTransformer
from spkprune.models import create_model, get_config, list_models
from spkprune.models.sdt_presets import SDT_PRESETS

FIXTURES = fixturekit.ROOT / "sdt-small"
GOLDEN = FIXTURES / "golden_small.safetensors"
ACTIVATIONS = FIXTURES / "golden_small_activations.safetensors"

# The fixture's constructor: the CIFAR-10 configuration with embed_dims=64, depths=1, T=2 (8 heads, "0011").
SMALL = dict(embed_dim=64, depth=1, timesteps=2)
# Neurons the original creates and never calls: listed in the fixture's module order, absent here.
NEVER_CALLED = ("patch_embed.rpe_lif", "block.0.attn.attn_lif")


def golden_state_dict() -> dict[str, torch.Tensor]:
    return fixturekit.golden_state_dict(FIXTURES)


def fixture_keys() -> list[tuple[str, list[int]]]:
    return fixturekit.fixture_keys(FIXTURES)


@pytest.fixture(scope="module")
def golden_model() -> SpikeDrivenTransformer:
    model = create_model("sdt-2-512-cifar10", **SMALL)
    model.load_state_dict(golden_state_dict(), strict=True)
    return model.eval()


def test_fixture_constructor_is_the_small_cifar_configuration():
    with safe_open(GOLDEN, "pt") as f:
        assert f.metadata()["constructor"] == "{'embed_dims': 64, 'num_heads': 8, 'depths': 1, 'T': 2}"
    cfg = get_config("sdt-2-512-cifar10", **SMALL)
    assert cfg.original_kwargs()["pooling_stat"] == "0011" and cfg.num_heads == 8 and cfg.num_tokens == 64


def test_state_dict_has_the_original_keys_shapes_and_order(golden_model):
    expected = fixture_keys()
    own = golden_model.state_dict()
    assert [(k, list(v.shape)) for k, v in own.items()] == expected
    original = golden_state_dict()
    assert all(own[k].dtype == original[k].dtype for k in own)


def test_strict_load_rejects_a_foreign_state_dict_with_one_clear_error():
    state = golden_state_dict()
    state.pop("head.bias")
    state["block.0.attn.q_conv.weight"] = torch.zeros(64, 64)
    with pytest.raises(SpkpruneError, match="mismatched shapes.*missing keys"):
        create_model("sdt-2-512-cifar10", **SMALL).load_state_dict(state, strict=True)


def test_every_spike_and_the_logits_equal_the_original_code(golden_model):
    tensors = load_file(GOLDEN)
    logits, spikes = fixturekit.run_recording_spikes(golden_model, tensors["__input__"])
    expected = fixturekit.expected_spikes(FIXTURES)
    assert set(spikes) == set(expected) and len(spikes) == 12
    for name, fired in spikes.items():
        assert fired.shape == expected[name].shape, name
        assert torch.equal(fired, expected[name]), f"spikes differ at {name}"
        assert expected[name].any(), f"{name} never fires in the fixture: the comparison would prove little"
    # Bit for bit: the same float32 operations in the same order as the original.
    assert torch.equal(logits, tensors["__logits__"])


def test_neuron_sites_follow_the_original_module_order(golden_model):
    with safe_open(ACTIVATIONS, "pt") as f:
        original_order = f.metadata()["sites_in_order"].split(",")
    assert list(golden_model.neuron_sites()) == [name for name in original_order if name not in NEVER_CALLED]


def test_forward_resets_neuron_state_so_repeated_calls_agree(golden_model):
    fixturekit.check_calls_are_independent(golden_model, load_file(GOLDEN)["__input__"])


# `sum(p.numel())` of the original code's model for each preset (computed by instantiating
# BICLab/Spike-Driven-Transformer's SpikeDrivenTransformer with the preset's original_kwargs()); "used" leaves out
# `talking_heads`, which the original creates and never calls. The fixture README gives the CIFAR-10 model's
# 10.23 M. See docs/model-families.md for the paper's figures.
PARAMETER_COUNTS = {
    "sdt-2-512-cifar10": (10_233_546, 10_233_418),
    "sdt-2-256-cifar10": (2_567_082, 2_566_954),
    "sdt-2-512-cifar100": (10_279_716, 10_279_588),
    "sdt-2-256-cifar100": (2_590_212, 2_590_084),
    "sdt-2-256-cifar10dvs": (2_566_794, 2_566_666),
    "sdt-2-256-dvs128": (2_567_051, 2_566_923),
    "sdt-2-256-dvs128-t10": (2_567_051, 2_566_923),
    "sdt-8-384-imagenet": (16_816_536, 16_816_024),
    "sdt-6-512-imagenet": (23_373_736, 23_373_352),
    "sdt-8-512-imagenet": (29_689_896, 29_689_384),
    "sdt-10-512-imagenet": (36_006_056, 36_005_416),
    "sdt-8-768-imagenet": (66_339_144, 66_338_632),
    "sdt-2-64-digits": (163_650, 163_522),
}


def test_every_preset_has_a_parameter_count():
    assert sorted(PARAMETER_COUNTS) == list_models(family="sdt")


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_match_the_original(name):
    with torch.device("meta"):  # shapes only: the big presets build in a fraction of a second
        model = create_model(name)
    all_params, used = PARAMETER_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == all_params
    assert model.used_parameter_count() == used


def test_presets_follow_the_original_conf_files():
    assert get_config("sdt-2-512-cifar10") == SDTConfig(32, 3, 10, 512, 8, 2, 4, "0011", dataset="cifar10")
    dvs = get_config("sdt-2-256-cifar10dvs")
    assert (dvs.img_size, dvs.in_channels, dvs.timesteps, dvs.pooling_stat, dvs.dvs_mode) == (64, 2, 10, "0011", True)
    gesture = get_config("sdt-2-256-dvs128")  # train.py sets dvs_mode for CIFAR10-DVS only
    assert (gesture.img_size, gesture.timesteps, gesture.pooling_stat, gesture.dvs_mode) == (128, 16, "0111", False)
    assert get_config("sdt-2-256-dvs128-t10").timesteps == 10
    for name in list_models("*imagenet*", family="sdt"):
        cfg = get_config(name)
        shape = (cfg.img_size, cfg.pooling_stat, cfg.timesteps, cfg.num_classes, cfg.num_tokens)
        assert shape == (224, "1111", 4, 1000, 196), name


def test_digits_preset_runs_on_8x8_digits_with_a_16_token_grid():
    model = create_model("sdt-2-64-digits").eval()
    assert model.num_tokens == 16 and model.config.grid_size == 4 and model.config.depth == 2
    with torch.no_grad():
        logits = model(torch.rand(5, 1, 8, 8))
    assert logits.shape == (5, 10)


def test_event_frames_keep_their_time_steps_and_dvs_mode_erodes():
    cfg = dict(embed_dim=32, num_heads=8, depth=1, img_size=32)
    model = create_model("sdt-2-256-cifar10dvs", **cfg)
    plain = create_model("sdt-2-256-cifar10dvs", **cfg, dvs_mode=False)
    plain.load_state_dict(model.state_dict())  # dvs_mode adds no parameters
    site = model.neuron_sites()["patch_embed.proj_lif"]
    site.record = True
    frames = (torch.rand(2, 3, 2, 32, 32) < 0.3).float()
    with torch.no_grad():  # training mode: batch statistics make a fresh model fire
        logits, plain_logits = model(frames), plain(frames)
    site.record = False
    assert logits.shape == (2, 10) and site.last_spikes.shape[:2] == (3, 2)  # T comes from the frames
    assert not torch.equal(logits, plain_logits)


def test_input_of_the_wrong_shape_is_refused_with_the_expected_shape():
    model = create_model("sdt-2-64-digits")
    with pytest.raises(SpkpruneError, match=r"expects images \[B,1,8,8\]"):
        model(torch.rand(2, 3, 8, 8))


def test_prunable_weights_are_the_used_conv_and_linear_weights():
    model = create_model("sdt-2-64-digits")
    prunable = model.prunable_weights()
    assert len(prunable) == 5 + 6 * 2 + 1  # 4 stem convs + rpe, q k v proj fc1 fc2 per block, head
    assert "patch_embed.rpe_conv.weight" in prunable and "head.weight" in prunable
    assert not any("talking_heads" in k or "bn" in k or k.endswith("bias") for k in prunable)
    state = model.state_dict()
    assert all(state[key].data_ptr() == param.data_ptr() for key, param in prunable.items())


def test_neuron_sites_have_the_original_settings():
    sites = create_model("sdt-2-64-digits").neuron_sites()
    assert len(sites) == 4 + 7 * 2 + 1  # stem stages; shortcut, q, k, v, talking_heads, fc1, fc2 per block; head
    assert sites["block.1.attn.talking_heads_lif"].v_threshold == 0.5
    assert all(s.v_threshold == 1.0 for n, s in sites.items() if not n.endswith("talking_heads_lif"))
    assert all(s.tau == 2.0 and s.detach_reset and s.v_reset == 0.0 for s in sites.values())


def test_config_errors_name_the_problem():
    with pytest.raises(SpkpruneError, match="pooling_stat"):
        get_config("sdt-2-64-digits", pooling_stat="011")
    with pytest.raises(SpkpruneError, match="divisible by 2\\*\\*4"):
        get_config("sdt-2-64-digits", pooling_stat="1111", img_size=8 + 4)
    with pytest.raises(SpkpruneError, match="attn_mode"):
        get_config("sdt-2-64-digits", attn_mode="softmax")
    with pytest.raises(SpkpruneError, match="unknown option"):
        get_config("sdt-2-64-digits", depths=2)
    with pytest.raises(SpkpruneError, match="unknown preset 'sdt-4-384-cifar10'"):
        create_model("sdt-4-384-cifar10")


def test_config_round_trips_through_a_dict():
    for name, cfg in SDT_PRESETS.items():
        assert SDTConfig.from_dict(cfg.to_dict()) == cfg, name
