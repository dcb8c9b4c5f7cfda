"""The Spikformer family: fidelity to the original code, checkpoint compatibility, presets, the pruning interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fixturekit
import spkprune
from spkprune.errors import SpkpruneError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "spikformer-small"
GOLDEN = FIXTURES / "golden_small.safetensors"
ACTIVATIONS = FIXTURES / "golden_small_activations.safetensors"

# The fixture's constructor: img 32, patch 4, embed 64, heads 4, mlp 4, in 3, classes 10, depths 1, T 2.
SMALL = dict(embed_dim=64, num_heads=4, depth=1, timesteps=2)


def golden_state_dict() -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(GOLDEN).items() if not k.startswith("__")}


@pytest.fixture(scope="module")
def golden_model():
    model = spkprune.create_model("spikformer-4-384-cifar10", **SMALL)
    model.load_state_dict(golden_state_dict(), strict=True)
    return model.eval()


def test_fixture_spikes_and_logits_match_the_original_code(golden_model):
    tensors = load_file(GOLDEN)
    activations = load_file(ACTIVATIONS)
    sites = golden_model.neuron_sites()
    for site in sites.values():
        site.record = True
    with torch.no_grad():
        logits = golden_model(tensors["__input__"])
    spike_keys = [k for k in activations if k.startswith("__spikes__.")]
    assert len(spike_keys) == len(sites) == 12
    for key in spike_keys:
        site = sites[key.removeprefix("__spikes__.")]
        expected = activations[key]
        assert site.last_spikes.shape == expected.shape, key
        assert torch.equal(site.last_spikes.to(torch.uint8), expected), f"spikes differ at {key}"
    torch.testing.assert_close(logits, tensors["__logits__"], atol=1e-5, rtol=0)


def test_fixture_features_match(golden_model):
    activations = load_file(ACTIVATIONS)
    with torch.no_grad():
        x = golden_model.encode(activations["__input__"])
        feat = golden_model.patch_embed(x)
        torch.testing.assert_close(feat, activations["__feat__.patch_embed"], atol=1e-6, rtol=0)
        out, _ = golden_model.forward_tokens(feat)
        torch.testing.assert_close(out, activations["__feat__.block.0"], atol=1e-6, rtol=0)


def test_forward_resets_neuron_state_so_repeated_calls_agree(golden_model):
    fixturekit.check_calls_are_independent(golden_model, load_file(GOLDEN)["__input__"])


def test_state_dict_round_trips_with_original_keys(golden_model):
    original = golden_state_dict()
    own = golden_model.state_dict()
    assert sorted(own) == sorted(original)  # safetensors stores keys sorted; the order is checked below
    assert list(own) == _expected_cifar_keys(1)
    for key, value in own.items():
        assert value.shape == original[key].shape and value.dtype == original[key].dtype
    with safe_open(GOLDEN, "pt") as f:
        assert '"depths": 1' in f.metadata()["constructor_kwargs"]


def _expected_cifar_keys(depth: int) -> list[str]:
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = []
    for suffix in ("", "1", "2", "3"):
        keys += [f"patch_embed.proj_conv{suffix}.weight"] + [f"patch_embed.proj_bn{suffix}.{b}" for b in bn]
    keys += ["patch_embed.rpe_conv.weight"] + [f"patch_embed.rpe_bn.{b}" for b in bn]
    for i in range(depth):
        keys += [f"block.{i}.norm1.weight", f"block.{i}.norm1.bias"]
        for p in ("q", "k", "v", "proj"):
            keys += [f"block.{i}.attn.{p}_linear.weight", f"block.{i}.attn.{p}_linear.bias"]
            keys += [f"block.{i}.attn.{p}_bn.{b}" for b in bn]
        keys += [f"block.{i}.norm2.weight", f"block.{i}.norm2.bias"]
        for p in ("fc1", "fc2"):
            keys += [f"block.{i}.mlp.{p}_linear.weight", f"block.{i}.mlp.{p}_linear.bias"]
            keys += [f"block.{i}.mlp.{p}_bn.{b}" for b in bn]
    return keys + ["head.weight", "head.bias"]


def test_cifar_4_384_state_dict_matches_the_spec():
    sd = spkprune.create_model("spikformer-4-384-cifar10").state_dict()
    assert list(sd) == _expected_cifar_keys(4) and len(sd) == 216
    assert sd["patch_embed.proj_conv.weight"].shape == (48, 3, 3, 3)
    assert sd["patch_embed.rpe_conv.weight"].shape == (384, 384, 3, 3)
    assert sd["block.3.mlp.fc1_linear.weight"].shape == (1536, 384)
    assert sd["block.3.mlp.fc2_linear.weight"].shape == (384, 1536)
    assert sd["block.0.attn.q_bn.num_batches_tracked"].shape == ()
    assert sd["head.weight"].shape == (10, 384)


def test_dvs_and_imagenet_state_dicts_match_the_spec():
    dvs = spkprune.create_model("spikformer-2-256-cifar10dvs").state_dict()
    assert len(dvs) == 121 and next(iter(dvs)) == "pos_embed" and dvs["pos_embed"].shape == (1, 64, 256)
    assert dvs["block.0.attn.q_conv.weight"].shape == (256, 256, 1) and "block.0.attn.q_conv.bias" not in dvs
    assert dvs["block.1.attn.proj_conv.bias"].shape == (256,)
    assert dvs["block.1.mlp.fc1_conv.weight"].shape == (1024, 256, 1)
    assert "norm.weight" in dvs and "norm.bias" in dvs
    imagenet = spkprune.create_model("spikformer-8-512-imagenet").state_dict()
    assert len(imagenet) == 376 and "pos_embed" not in imagenet and "norm.weight" not in imagenet
    assert imagenet["block.7.mlp.fc1_conv.weight"].shape == (2048, 512, 1, 1)
    assert imagenet["block.7.mlp.fc1_bn.running_var"].shape == (2048,)


# SPIKFORMER.md section 5. We reproduce both counts: "all" is sum(p.numel()) over the state_dict's parameters,
# "used" leaves out the LayerNorms (and the DVS pos_embed) that the original creates but never calls.
PARAMETER_COUNTS = {
    "spikformer-4-384-cifar10": (9_330_874, 9_324_730),
    "spikformer-4-384-cifar100": (9_365_524, 9_359_380),
    "spikformer-4-256-cifar10": (4_159_274, 4_155_178),
    "spikformer-4-256-cifar100": (4_182_404, 4_178_308),
    "spikformer-2-384-cifar10": (5_768_122, 5_765_050),
    "spikformer-2-384-cifar100": (5_802_772, 5_799_700),
    "spikformer-4-512-cifar10": (16_563_786, 16_555_594),
    "spikformer-2-256-cifar10dvs": (2_585_610, 2_566_666),
    "spikformer-2-256-dvs128": (2_585_867, 2_566_923),
    "spikformer-8-384-imagenet": (16_828_312, 16_816_024),
    "spikformer-8-512-imagenet": (29_705_768, 29_689_384),
    "spikformer-8-768-imagenet": (66_363_208, 66_338_632),
}


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_match_the_original(name):
    model = spkprune.create_model(name)
    all_params, used = PARAMETER_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) == all_params
    assert model.used_parameter_count() == used


def test_every_preset_builds_and_runs_a_forward():
    for name in spkprune.list_models(family="spikformer"):  # the other families: test_families.py
        cfg = spkprune.get_config(name)
        # Small stand-ins of the big presets keep the test fast; structure (variant, pools) is the preset's.
        overrides = dict(timesteps=2)
        if cfg.embed_dim > 64:
            overrides.update(embed_dim=32, num_heads=4, depth=1)
        model = spkprune.create_model(name, **overrides).eval()
        shape = (1, cfg.in_channels, cfg.img_size, cfg.img_size)
        if cfg.variant == "dvs":
            shape = (1, 2, *shape[1:])
        with torch.no_grad():
            logits = model(torch.rand(shape))
        assert logits.shape == (1, cfg.num_classes), name


def test_digits_presets_have_room_for_a_token_selector():
    for name in spkprune.list_models("*digits*", family="spikformer"):
        model = spkprune.create_model(name)
        assert model.num_tokens >= 16 and model.config.depth >= 2
        assert model.selector_locations() == list(range(1, model.config.depth))


def test_prunable_weights_are_conv_and_linear_weights_only():
    model = spkprune.create_model("spikformer-2-256-cifar10dvs")
    prunable = model.prunable_weights()
    assert "patch_embed.proj_conv.weight" in prunable and "head.weight" in prunable
    assert "block.1.attn.q_conv.weight" in prunable and "block.1.mlp.fc2_conv.weight" in prunable
    assert not any(k.endswith("bias") or "bn" in k or "norm" in k or "pos_embed" in k for k in prunable)
    state = model.state_dict()
    for key, param in prunable.items():
        assert state[key].data_ptr() == param.data_ptr()
    # 5 SPS convs + 6 projections per block + head
    assert len(prunable) == 5 + 6 * 2 + 1


def test_neuron_sites_cover_every_lif_with_the_attention_threshold():
    model = spkprune.create_model("spikformer-2-64-digits")
    sites = model.neuron_sites()
    assert len(sites) == 5 + 7 * 2
    assert sites["block.1.attn.attn_lif"].v_threshold == 0.5
    assert all(s.v_threshold == 1.0 for n, s in sites.items() if not n.endswith("attn_lif"))
    assert all(s.tau == 2.0 and s.detach_reset and s.v_reset == 0.0 for s in sites.values())


def test_event_input_keeps_its_time_steps():
    model = spkprune.create_model("spikformer-2-256-cifar10dvs", embed_dim=32, num_heads=4, depth=1).eval()
    for site in model.neuron_sites().values():
        site.record = True
    with torch.no_grad():
        model(torch.rand(2, 3, 2, 128, 128).round())
    assert model.neuron_sites()["block.0.attn.q_lif"].last_spikes.shape == (3, 2, 64, 32)


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 32, 32), (2, 1, 8, 9), (2, 8, 8), (2, 4, 1, 8, 8)],
)
def test_wrong_input_shapes_name_the_preset_and_both_shapes(shape):
    model = spkprune.create_model("spikformer-2-64-digits")
    with pytest.raises(SpkpruneError) as err:
        model(torch.rand(shape))
    message = str(err.value)
    assert "spikformer-2-64-digits" in message and "[B,1,8,8]" in message and str(list(shape)) in message


def test_mismatched_state_dict_is_one_clear_error():
    model = spkprune.create_model("spikformer-2-64-digits")
    other = spkprune.create_model("spikformer-4-64-digits").state_dict()
    with pytest.raises(SpkpruneError) as err:
        model.load_state_dict(other)
    assert "unexpected keys" in str(err.value) and "spikformer-2-64-digits" in str(err.value)
    bad = model.state_dict()
    bad["head.weight"] = torch.zeros(3, 64)
    del bad["head.bias"]
    with pytest.raises(SpkpruneError) as err:
        model.load_state_dict(bad)
    assert "head.weight expected [10, 64] received [3, 64]" in str(err.value) and "missing keys: head.bias" in str(err.value)


def test_unknown_preset_and_bad_override():
    with pytest.raises(SpkpruneError, match="unknown preset"):
        spkprune.create_model("spikformer-9-999-mnist")
    with pytest.raises(SpkpruneError, match="unknown option"):
        spkprune.create_model("spikformer-2-64-digits", heads=3)
    with pytest.raises(SpkpruneError, match="divisible"):
        spkprune.create_model("spikformer-2-64-digits", num_heads=3)


def test_config_round_trips_through_a_dict():
    cfg = spkprune.get_config("spikformer-2-256-dvs128", timesteps=8)
    from spkprune.models import SpikformerConfig, model_from_config

    assert SpikformerConfig.from_dict(cfg.to_dict()) == cfg
    assert model_from_config(cfg.to_dict()).config.timesteps == 8
