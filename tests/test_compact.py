"""Compaction: per-block widths in the model, what is provably removable, and the compacted model computing exactly
what the masked one computes (every neuron's spikes and the logits), through the store, export and counting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import spkprune
from spkprune.checkpoint import Checkpoint, build_model, load_checkpoint, save_checkpoint
from spkprune.compact import CompactSettings, compact_checkpoint, run_compact, silent_channels
from spkprune.counting import count_operations
from spkprune.data import get_dataset
from spkprune.errors import SpkpruneError
from spkprune.export.exporter import export_checkpoint
from spkprune.models import fastpath
from spkprune.models.lif_kernels import charge_in_place
from spkprune.models.neurons import LIF
from spkprune.models.presets import SpikformerConfig
from spkprune.models.selector import attach_selectors, selector_config
from spkprune.store import Store
from spkprune.training.jobs import run_evaluate, run_train
from spkprune.training.settings import EvaluateSettings, TrainSettings

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "spikformer-small"
CIFAR, DIGITS = "spikformer-4-384-cifar10", "spikformer-2-64-digits"
WIDTHS = {
    "spikformer-2-64-digits": dict(block_heads=[1, 3], block_mlp_hidden=[5, 200], stem_channels=[3, 7, 20]),
    "spikformer-2-256-cifar10dvs": dict(img_size=32, num_pools=2, timesteps=2, block_heads=[2, 16],
                                        block_mlp_hidden=[7, 9], stem_channels=[5, 6, 7]),
    "spikformer-8-384-imagenet": dict(img_size=32, depth=2, timesteps=2, block_heads=[1, 2], block_mlp_hidden=[7, 9],
                                      stem_channels=[5, 6, 7]),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    cfg = model.config
    shape = (batch, cfg.in_channels, cfg.img_size, cfg.img_size)
    return torch.rand(batch, cfg.timesteps, *shape[1:]) if cfg.variant == "dvs" else torch.rand(shape) * 4


# ------------------------------------------------------------------------------------------ per-block widths
@pytest.mark.parametrize("preset", list(WIDTHS))
def test_widths_round_trip_and_every_variant_runs_on_every_path(preset):
    torch.manual_seed(0)
    model = spkprune.create_model(preset, **WIDTHS[preset])
    stored = json.loads(json.dumps(model.config.to_dict()))
    assert SpikformerConfig.from_dict(stored) == model.config
    rebuilt = spkprune.create_model(preset, **stored)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.block[0].attn.num_heads == WIDTHS[preset]["block_heads"][0]
    x = _input(model)
    with torch.no_grad():
        plain = model.eval()(x)
        torch.testing.assert_close(fastpath.prepare_for_inference(model)(x), plain, atol=1e-4, rtol=0)
    fastpath.prepare_for_training(model.train())  # fused BatchNorm + LIF, joint q/k/v, packed spikes
    model(x).sum().backward()


def test_uniform_configs_are_unchanged_and_bad_widths_are_refused():
    assert spkprune.get_config(DIGITS).to_dict()["block_heads"] is None
    uniform = spkprune.create_model(DIGITS, block_heads=[4, 4], block_mlp_hidden=[256, 256], stem_channels=[8, 16, 32])
    assert {k: v.shape for k, v in uniform.state_dict().items()} == \
        {k: v.shape for k, v in spkprune.create_model(DIGITS).state_dict().items()}
    with pytest.raises(SpkpruneError, match="block_heads must be 2 whole numbers >= 1"):
        spkprune.get_config(DIGITS, block_heads=[1, 2, 3])
    with pytest.raises(SpkpruneError, match="stem_channels must be 3 whole numbers >= 1"):
        spkprune.get_config(DIGITS, stem_channels=[0, 4, 4])


# --------------------------------------------------------------------------------------------- silence
def test_a_constant_below_the_threshold_never_fires_and_one_at_it_does():
    below = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    drive = torch.stack([below, torch.tensor(0.999999), torch.tensor(1.0), torch.tensor(1.5)]).expand(200, 4).clone()
    spikes = charge_in_place(drive, 2.0, 1.0)
    assert not spikes[:, :2].any() and spikes[:, 2:].any(0).all()

    layer, bn, lif = nn.Linear(3, 4), nn.BatchNorm1d(4).eval(), LIF()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.99, 1.0, 5.0, -10.0]))  # constant: 0.99, 1.0, 5.0, about -8
    silent = silent_channels(layer, bn, lif, torch.tensor([True, True, True, True]))
    assert silent.tolist() == [True, False, False, True]
    assert not silent_channels(layer, bn, lif, torch.zeros(4, dtype=torch.bool)).any()  # weights in: may fire


# ---------------------------------------------------------------------------------------- the equality
def _zero(masks: dict, key: str, index) -> None:
    masks[key][index] = False


def _masked_checkpoint(model: nn.Module, masks: dict, ref: str = "masked") -> Checkpoint:
    weights = {k: (v * masks[k] if k in masks else v).clone() for k, v in model.state_dict().items()}
    meta = {"arch": model.preset, "config": model.config.to_dict(), "selector": None}
    return Checkpoint(weights, masks, meta, ref)


def _site_channels(name: str, compaction) -> tuple[int, list[int]] | None:
    """(channel dimension, kept channels of the big model) of a neuron site that compaction narrowed, else None."""
    plan = compaction.checkpoint.meta["compacted"]["removed"]
    config = compaction.model.config
    parts = name.split(".")
    if name.startswith("patch_embed.proj_lif") and name[-1] in ("f", "1", "2"):
        stage = {"f": 0, "1": 1, "2": 2}[name[-1]]
        gone = set(plan.get("stem", {}).get(f"patch_embed.proj_conv{'' if stage == 0 else stage}", []))
        width = config.stem_widths[stage] + len(gone)
        return 2, [c for c in range(width) if c not in gone]
    if parts[0] == "block" and parts[2] == "attn" and parts[3] != "proj_lif":
        gone = set(plan.get("heads", {}).get(f"block.{parts[1]}", []))
        d = config.head_dim
        heads = config.block_heads[int(parts[1])] + len(gone)
        return -1, [h * d + i for h in range(heads) if h not in gone for i in range(d)]
    if name.endswith("mlp.fc1_lif"):
        gone = set(plan.get("mlp", {}).get(f"block.{parts[1]}", []))
        width = config.block_mlp_hidden[int(parts[1])] + len(gone)
        return -1, [c for c in range(width) if c not in gone]
    return None


def assert_same_outputs(masked: Checkpoint, compaction, x: torch.Tensor) -> None:
    """Logits and every neuron's spikes (the kept channels of narrowed sites) equal; the model really fires."""
    big, small = build_model(masked).eval(), compaction.model.eval()
    sites = {**{f"big:{k}": s for k, s in big.neuron_sites().items()},
             **{f"small:{k}": s for k, s in small.neuron_sites().items()}}
    for site in sites.values():
        site.record = True
    with torch.no_grad():
        expected, got = big(x), small(x)
    assert torch.equal(expected, got), (expected - got).abs().max()
    for name in big.neuron_sites():
        want, have = sites[f"big:{name}"].last_spikes, sites[f"small:{name}"].last_spikes
        narrowed = _site_channels(name, compaction)
        if narrowed is not None:
            want = want.index_select(narrowed[0] % want.dim(), torch.tensor(narrowed[1]))
        assert torch.equal(want, have), name
    assert sum(float(s.last_spikes.sum()) for s in sites.values()) > 0


def _fixture_model() -> nn.Module:
    model = spkprune.create_model(CIFAR, embed_dim=64, num_heads=4, depth=1, timesteps=2)
    state = {k: v for k, v in load_file(FIXTURES / "golden_small.safetensors").items() if not k.startswith("__")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _structured_masks(model: nn.Module) -> dict:
    """Masks that cut head 1 (projection columns), silence head 2 (its q rows; q BatchNorm pushed far below the
    threshold), cut 10 MLP channels by fc2 columns and 10 by fc1 rows (one of them pushed to fire, which must stay;
    another pushed to fire but unread, which goes) and empty four stem channels of stage 1."""
    masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in model.prunable_weights().items()}
    d = model.config.head_dim
    with torch.no_grad():
        _zero(masks, "block.0.attn.proj_linear.weight", (slice(None), slice(d, 2 * d)))
        _zero(masks, "block.0.attn.q_linear.weight", slice(2 * d, 3 * d))
        model.block[0].attn.q_bn.bias[2 * d:3 * d] = -20.0
        _zero(masks, "block.0.mlp.fc2_linear.weight", (slice(None), slice(0, 10)))
        _zero(masks, "block.0.mlp.fc1_linear.weight", slice(10, 20))
        model.block[0].mlp.fc1_bn.bias[10:20] = -20.0
        model.block[0].mlp.fc1_bn.bias[12] = 20.0  # fires every step with no weight: stays
        _zero(masks, "block.0.mlp.fc1_linear.weight", 30)
        model.block[0].mlp.fc1_bn.bias[30] = 20.0
        _zero(masks, "block.0.mlp.fc2_linear.weight", (slice(None), 30))  # fires, but nothing reads it: goes
        _zero(masks, "patch_embed.proj_conv1.weight", slice(0, 4))
        model.patch_embed.proj_bn1.bias[0:4] = -20.0
        model.patch_embed.proj_bn1.bias[2] = 20.0  # fires with no weight: stays
    return masks


def test_the_compacted_fixture_fires_exactly_as_the_masked_one():
    model = _fixture_model()
    masked = _masked_checkpoint(model, _structured_masks(model))
    compaction = compact_checkpoint(masked)
    removed = compaction.removed
    assert removed["heads"] == {"block.0": [1, 2]}
    mlp = removed["mlp"]["block.0"]
    assert set(range(10)) | {10, 11, 13, 14, 15, 16, 17, 18, 19, 30} == set(mlp) and 12 not in mlp
    assert removed["stem"] == {"patch_embed.proj_conv1": [0, 1, 3]}
    config = compaction.model.config
    assert (config.block_heads, config.block_mlp_hidden, config.stem_channels) == ((2,), (236,), (8, 13, 32))
    assert compaction.params_after < compaction.params_before
    x = load_file(FIXTURES / "golden_small.safetensors")["__input__"]
    assert_same_outputs(masked, compaction, x)


def firing_digits(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = spkprune.create_model(DIGITS).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.bias.normal_(1.0, 1.0)
    return model


def _digits_masks(model: nn.Module) -> dict:
    """Random unstructured pruning plus whole structures zeroed as structured pruning does (rows and columns)."""
    generator = torch.Generator().manual_seed(1)
    masks = {k: torch.rand(w.shape, generator=generator) > 0.3 for k, w in model.prunable_weights().items()}
    d = model.config.head_dim
    for block, head in ((0, 0), (1, 3)):
        for p in "qkv":
            _zero(masks, f"block.{block}.attn.{p}_linear.weight", slice(head * d, (head + 1) * d))
        _zero(masks, f"block.{block}.attn.proj_linear.weight", (slice(None), slice(head * d, (head + 1) * d)))
    channels = torch.arange(0, 256, 3)
    _zero(masks, "block.1.mlp.fc1_linear.weight", channels)
    _zero(masks, "block.1.mlp.fc2_linear.weight", (slice(None), channels))
    _zero(masks, "patch_embed.proj_conv.weight", slice(0, 3))
    _zero(masks, "patch_embed.proj_conv1.weight", (slice(None), slice(0, 3)))
    return masks


def test_a_compacted_digits_model_fires_exactly_as_the_masked_one_on_digits_images():
    model = firing_digits()
    masked = _masked_checkpoint(model, _digits_masks(model))
    compaction = compact_checkpoint(masked)
    assert compaction.removed["heads"] == {"block.0": [0], "block.1": [3]}
    assert len(compaction.removed["mlp"]["block.1"]) >= 86 and compaction.removed["stem"]
    images = get_dataset("digits", "test").images[:64]
    assert_same_outputs(masked, compaction, images)
    # the masks on kept weights come along, cut to the kept rows and columns
    kept = compaction.checkpoint.masks["block.1.mlp.fc1_linear.weight"]
    assert kept.shape[0] == compaction.model.config.block_mlp_hidden[1] and not kept.all()


def test_the_last_head_and_channel_always_stay_and_an_unpruned_model_has_nothing_to_remove():
    model = firing_digits()
    masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in model.prunable_weights().items()}
    with pytest.raises(SpkpruneError, match="^masked has nothing to remove: "):
        compact_checkpoint(_masked_checkpoint(model, masks))
    _zero(masks, "block.0.attn.proj_linear.weight", slice(None))
    _zero(masks, "block.0.mlp.fc2_linear.weight", slice(None))
    compaction = compact_checkpoint(_masked_checkpoint(model, masks))
    assert compaction.model.config.block_heads == (1, 4)
    assert compaction.model.config.block_mlp_hidden == (1, 256)


def test_an_emptied_stem_stage_frees_the_next_one():
    model = firing_digits()
    masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in model.prunable_weights().items()}
    with torch.no_grad():
        model.patch_embed.proj_bn.bias[:4] = -20.0  # channels 0-3 of stage 0 can never fire
        model.patch_embed.proj_bn1.bias[:2] = -20.0
    _zero(masks, "patch_embed.proj_conv.weight", slice(0, 4))
    _zero(masks, "patch_embed.proj_conv1.weight", (slice(0, 2), slice(4, None)))  # stage-1 channels 0, 1 read 0-3 only
    masked = _masked_checkpoint(model, masks)
    compaction = compact_checkpoint(masked)
    assert compaction.removed["stem"] == {"patch_embed.proj_conv": [0, 1, 2, 3], "patch_embed.proj_conv1": [0, 1]}
    assert_same_outputs(masked, compaction, get_dataset("digits", "test").images[:32])


# ------------------------------------------------------------------------------ store, export, counting
def test_compact_in_the_store_export_and_count(tmp_path):
    model = firing_digits()
    masked = _masked_checkpoint(model, _digits_masks(model))
    store = Store.open(tmp_path / "store", create=True)
    source = save_checkpoint(store, "ticket", "main", masked)
    outcome = run_compact(store, CompactSettings(ref="ticket", name="small"))
    art = outcome.artifact
    assert art.parent == "ticket@main" and outcome.size_before == source.size and art.size < source.size
    meta = load_checkpoint("small", store).meta
    assert meta["compacted"]["from"] == "ticket@main" and meta["compacted"]["removed"]["heads"]
    assert meta["compacted"]["params_after"] < meta["compacted"]["params_before"]
    assert meta["config"]["block_heads"] == [3, 3]
    with pytest.raises(SpkpruneError, match="small@main already exists"):
        run_compact(store, CompactSettings(ref="ticket", name="small"))

    folder = export_checkpoint("small", tmp_path / "export", store=store).folder
    assert "- **compacted**: from ticket@main, removed 2 attention heads (block.0: 1, block.1: 1)" in \
        (folder / "README.md").read_text()
    again = build_model(load_checkpoint(str(folder), None)).eval()
    x = get_dataset("digits", "test").images[:16]
    with torch.no_grad():
        assert torch.equal(again(x), outcome.compaction.model(x))
    small = count_operations(outcome.compaction.model, masks=outcome.compaction.checkpoint.masks)
    dense = count_operations(build_model(masked).eval(), masks=masked.masks)
    assert small["totals"]["dense_macs"] < dense["totals"]["dense_macs"]
    assert small["totals"]["nonzero_macs"] == pytest.approx(dense["totals"]["nonzero_macs"], rel=0.02)


# ---------------------------------------------------------------------------------------- fewer time steps
def _with_selector(ckpt: Checkpoint) -> Checkpoint:
    model = build_model(ckpt)
    attach_selectors(model, {"locations": [1], "keep": 0.7, "scorer": "learned"})
    return Checkpoint(model.state_dict(), ckpt.masks, {**ckpt.meta, "selector": selector_config(model)}, ckpt.ref)


@pytest.mark.slow  # three short training runs: about 20 s
def test_a_ticket_with_a_selector_compacts_and_all_three_fine_tune_at_fewer_time_steps(tmp_path):
    model = firing_digits()
    store = Store.open(tmp_path / "store", create=True)
    ticket = _masked_checkpoint(model, _digits_masks(model))
    save_checkpoint(store, "ticket", "main", ticket)
    selected = _with_selector(ticket)
    save_checkpoint(store, "selected", "main", selected)
    compacted = run_compact(store, CompactSettings(ref="selected", name="small"))
    assert_same_outputs(selected, compacted.compaction, get_dataset("digits", "test").images[:32])

    for source in ("ticket", "selected", "small"):
        settings = TrainSettings(init=source, timesteps=2, epochs=1, limit_batches=2, name=f"{source}-t2")
        run_train(store, settings, progress=False)
        before, after = load_checkpoint(source, store), load_checkpoint(f"{source}-t2", store)
        assert after.meta["config"]["timesteps"] == 2
        assert {k: v for k, v in after.meta["config"].items() if k != "timesteps"} == \
            {k: v for k, v in before.meta["config"].items() if k != "timesteps"}
        assert after.meta["selector"] == before.meta.get("selector")
        assert after.masks.keys() == before.masks.keys()
        for key, mask in after.masks.items():
            assert torch.equal(mask, before.masks[key]) and not after.state_dict[key][~mask].any(), key
        assert run_evaluate(store, EvaluateSettings(ref=f"{source}-t2"))["timesteps"] == 2


@pytest.mark.parametrize("preset, small", [
    ("spikformer-2-256-cifar10dvs", dict(img_size=32, num_pools=2, timesteps=2)),
    ("spikformer-8-384-imagenet", dict(img_size=32, depth=2, timesteps=2)),
])
def test_the_dvs_and_imagenet_variants_compact_exactly(preset, small):
    torch.manual_seed(0)
    model = spkprune.create_model(preset, **small).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.bias.normal_(1.0, 1.0)
    masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in model.prunable_weights().items()}
    d, conv = model.config.head_dim, "conv"
    _zero(masks, f"block.0.attn.proj_{conv}.weight", (slice(None), slice(0, d)))
    _zero(masks, f"block.1.mlp.fc2_{conv}.weight", (slice(None), slice(0, 40)))
    _zero(masks, "patch_embed.proj_conv2.weight", (slice(None), slice(0, 5)))
    masked = _masked_checkpoint(model, masks)
    compaction = compact_checkpoint(masked)
    assert compaction.removed == {"heads": {"block.0": [0]}, "mlp": {"block.1": list(range(40))},
                                  "stem": {"patch_embed.proj_conv1": list(range(5))}}
    assert_same_outputs(masked, compaction, _input(model, batch=4))
