"""Structured pruning and compaction of the Spike-driven Transformer (`sdt`) and QKFormer (`qkformer`) families: the
structures each family has (exact groups of the digits presets), removal that changes no spike (the compacted model
against the masked one on the original code's fixture weights and on digits), `imp --granularity channel` removing
exact counts and never a layer's last structure, and compaction through the store, export and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import fixturekit
import spkprune
from spkprune.checkpoint import Checkpoint, build_model, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.compact import CompactSettings, compact_checkpoint, run_compact
from spkprune.data import get_dataset
from spkprune.errors import SpkpruneError
from spkprune.export.exporter import export_checkpoint
from spkprune.models import create_model, fastpath
from spkprune.models.families import FAMILIES
from spkprune.models.structure_sites import check_kinds, structure_sites
from spkprune.pruning import masks as M
from spkprune.pruning.imp import ImpSettings, run_imp
from spkprune.pruning.structured import removal_count
from spkprune.pruning.structures import Group, Slice, by_layer, is_removed, remove, structure_groups
from spkprune.store import Store
from spkprune.training import TrainConfig, fit

SDT, QK = "sdt-2-64-digits", "qkformer-3-64-digits"
FIXTURE_MODELS = {  # the original code's fixture weights: preset, overrides, folder
    "sdt": ("sdt-2-512-cifar10", dict(embed_dim=64, depth=1, timesteps=2), "sdt-small"),
    "qkformer": ("qkformer-4-384-cifar10", dict(embed_dim=64, depth=3, timesteps=2), "qkformer-small"),
}

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ the structures
def _counts(groups: list[Group]) -> dict[tuple[str, str], int]:
    return {layer: len(members) for layer, members in by_layer(groups).items()}


def test_sdt_structures_are_heads_mlp_channels_and_the_three_inner_stem_stages():
    groups = structure_groups(create_model(SDT))
    assert _counts(groups) == {
        ("stem", "patch_embed.proj_conv"): 8, ("stem", "patch_embed.proj_conv1"): 16,
        ("stem", "patch_embed.proj_conv2"): 32,
        ("heads", "block.0.attn"): 8, ("mlp", "block.0.mlp"): 256, ("heads", "block.1.attn"): 8,
        ("mlp", "block.1.mlp"): 256,
    }
    head = next(g for g in groups if g.kind == "heads" and g.layer == "block.1.attn" and g.index == 3)
    attn = "block.1.attn"
    assert head.weights == (*(Slice(f"{attn}.{p}_conv.weight", 0, 24, 32) for p in "qkv"),
                            Slice(f"{attn}.proj_conv.weight", 1, 24, 32))
    assert head.norms == tuple(Slice(f"{attn}.{p}_bn.weight", 0, 24, 32) for p in "qkv")
    channel = next(g for g in groups if g.kind == "mlp" and g.layer == "block.0.mlp" and g.index == 7)
    assert channel.weights == (Slice("block.0.mlp.fc1_conv.weight", 0, 7, 8),
                               Slice("block.0.mlp.fc2_conv.weight", 1, 7, 8))
    assert channel.norms == (Slice("block.0.mlp.fc1_bn.weight", 0, 7, 8),)
    mlp_site = next(s for s in structure_sites(create_model(SDT)) if s.kind == "mlp")
    assert mlp_site.producers[0].neuron == "block.0.mlp.fc2_lif"  # SDT's neuron sits before fc2
    stem = next(g for g in groups if g.kind == "stem" and g.layer == "patch_embed.proj_conv2" and g.index == 5)
    assert stem.weights == (Slice("patch_embed.proj_conv2.weight", 0, 5, 6),
                            Slice("patch_embed.proj_conv3.weight", 1, 5, 6))


def test_sdt_with_mlp_ratio_1_has_no_mlp_structures_and_refuses_them_in_one_line():
    # the hidden membrane takes the block's input as a shortcut: its channels are the residual stream's
    model = create_model(SDT, mlp_ratio=1)
    assert {g.kind for g in structure_groups(model)} == {"heads", "stem"}
    check_kinds(model, ("heads", "stem"))
    with pytest.raises(SpkpruneError, match=r"^--structures mlp: sdt-2-64-digits has no mlp structures; choose from "
                                            r"heads, stem$"):
        check_kinds(model, ("heads", "mlp"))


def test_qkformer_structures_are_heads_of_both_attentions_mlp_and_inner_patch_embedding_channels():
    groups = structure_groups(create_model(QK))
    assert _counts(groups) == {
        ("stem", "patch_embed1.proj_conv"): 8, ("stem", "patch_embed2.proj3_conv"): 32,
        ("stem", "patch_embed3.proj3_conv"): 64, ("heads", "stage1.0.tssa"): 8, ("mlp", "stage1.0.mlp"): 64,
        ("heads", "stage2.0.tssa"): 8,
        ("mlp", "stage2.0.mlp"): 128, ("heads", "stage3.0.ssa"): 8, ("mlp", "stage3.0.mlp"): 256,
    }
    token_head = next(g for g in groups if g.layer == "stage2.0.tssa" and g.index == 2)  # 32 channels / 8 heads
    attn = "stage2.0.tssa"
    assert token_head.weights == (Slice(f"{attn}.q_conv.weight", 0, 8, 12), Slice(f"{attn}.k_conv.weight", 0, 8, 12),
                                  Slice(f"{attn}.proj_conv.weight", 1, 8, 12))
    self_head = next(g for g in groups if g.layer == "stage3.0.ssa" and g.index == 7)
    assert [piece.key.split(".")[-2] for piece in self_head.weights] == ["q_conv", "k_conv", "v_conv", "proj_conv"]
    assert self_head.weights[0] == Slice("stage3.0.ssa.q_conv.weight", 0, 56, 64)
    channel = next(g for g in groups if g.layer == "stage1.0.mlp" and g.index == 63)
    assert channel.weights == (Slice("stage1.0.mlp.mlp1_conv.weight", 0, 63, 64),
                               Slice("stage1.0.mlp.mlp2_conv.weight", 1, 63, 64))
    tapped = next(g for g in groups if g.layer == "patch_embed1.proj_conv" and g.index == 5)  # the shortcut reads it
    assert tapped.weights == (Slice("patch_embed1.proj_conv.weight", 0, 5, 6),
                              Slice("patch_embed1.proj1_conv.weight", 1, 5, 6),
                              Slice("patch_embed1.proj_res_conv.weight", 1, 5, 6))
    imagenet = structure_groups(create_model("qkformer-10-384-imagenet", img_size=32, depth=4, embed_dim=48))
    assert {g.layer for g in imagenet} >= {"stage3.0.attn", "stage3.0.mlp", "stage2.1.tssa"}
    assert next(g for g in imagenet if g.layer == "stage3.0.mlp").weights[0].key == "stage3.0.mlp.fc1_conv.weight"


# ---------------------------------------------------------------------------------------- the equality
def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: torch.ones_like(w, dtype=torch.bool) for k, w in model.prunable_weights().items()}


def _masked(model: nn.Module, masks: dict, ref: str = "masked") -> Checkpoint:
    weights = {k: (v * masks[k] if k in masks else v).clone() for k, v in model.state_dict().items()}
    return Checkpoint(weights, masks, {"arch": model.preset, "config": model.config.to_dict(), "selector": None}, ref)


def _remove(masks: dict, model: nn.Module, layer: str, units: list[int], rows: bool = True) -> None:
    """Zero the consumer columns (and, with `rows`, the producer rows) of structures `units` of site `layer`."""
    site = next(s for s in structure_sites(model) if s.layer == layer)
    channels = torch.tensor(site.channels(units))
    for consumer in site.consumers:
        masks[f"{consumer}.weight"][:, channels] = False
    for producer in site.producers if rows else ():
        masks[f"{producer.layer}.weight"][channels] = False


def _owner(name: str, sites: list) -> object:
    """The structure site a neuron fires for: a producer's neuron, or any neuron inside an attention's heads."""
    return next(site for site in sites if name in {p.neuron for p in site.producers}
                or (site.kind == "heads" and name.startswith(site.layer + ".")))


def assert_same_spikes(masked: Checkpoint, compaction, x: torch.Tensor) -> int:
    """Logits equal and every neuron's spikes equal on the channels (or heads) the compacted model kept; returns the
    number of spikes compared."""
    big, small = build_model(masked).eval(), compaction.model.eval()
    sites = structure_sites(big)
    for model in (big, small):
        for neuron in model.neuron_sites().values():
            neuron.record = True
    with torch.no_grad():
        expected, got = big(x), small(x)
    assert torch.equal(expected, got), (expected - got).abs().max()
    fired = 0
    for name, neuron in big.neuron_sites().items():
        want, have = neuron.last_spikes, small.neuron_sites()[name].last_spikes
        if want.shape != have.shape:  # a narrowed neuron: compare the kept channels (or heads)
            site = _owner(name, sites)
            place = site.layer if site.kind == "stem" else site.layer.rsplit(".", 1)[0]
            gone = set(compaction.removed[site.kind][place])
            units = [u for u in range(site.units) if u not in gone]
            dim = next(d for d in range(want.dim()) if want.shape[d] != have.shape[d])
            index = site.channels(units) if want.shape[dim] == site.units * site.width else units
            want = want.index_select(dim, torch.tensor(index))
        assert torch.equal(want, have), name
        fired += int(have.sum())
    assert fired > 0
    return fired


def firing(preset: str, seed: int = 0, **overrides) -> nn.Module:
    """A model whose BatchNorm shifts make most neurons fire."""
    torch.manual_seed(seed)
    model = create_model(preset, **overrides).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.bias.normal_(1.0, 1.0)
    return model


def _fixture(family: str) -> tuple[nn.Module, torch.Tensor]:
    preset, overrides, folder = FIXTURE_MODELS[family]
    model = create_model(preset, **overrides)
    model.load_state_dict(fixturekit.golden_state_dict(fixturekit.ROOT / folder), strict=True)
    return model.eval(), load_file(fixturekit.ROOT / folder / "golden_small.safetensors")["__input__"]


def test_sdt_fixture_compacts_with_every_spike_unchanged():
    model, x = _fixture("sdt")
    masks = _full(model)
    _remove(masks, model, "block.0.attn", [1, 6])  # structured: producer rows and consumer columns
    _remove(masks, model, "block.0.attn", [3], rows=False)  # q, k, v keep firing: nothing reads the head
    _remove(masks, model, "block.0.mlp", list(range(0, 256, 2)))
    _remove(masks, model, "patch_embed.proj_conv1", [0, 5])
    masked = _masked(model, masks)
    compaction = compact_checkpoint(masked)
    assert compaction.removed == {"heads": {"block.0": [1, 3, 6]}, "mlp": {"block.0": list(range(0, 256, 2))},
                                  "stem": {"patch_embed.proj_conv1": [0, 5]}}
    config = compaction.model.config
    assert (config.block_heads, config.block_mlp_hidden, config.stem_channels) == ((5,), (128,), (8, 14, 32))
    assert compaction.model.block[0].attn.talking_heads.weight.shape == (5, 5, 1)
    assert assert_same_spikes(masked, compaction, x) > 0


def test_qkformer_fixture_compacts_with_every_spike_unchanged():
    model, x = _fixture("qkformer")
    masks = _full(model)
    _remove(masks, model, "stage1.0.tssa", [0, 7])
    _remove(masks, model, "stage2.0.tssa", [4], rows=False)
    _remove(masks, model, "stage3.0.ssa", [2])
    _remove(masks, model, "stage2.0.mlp", list(range(40)))
    _remove(masks, model, "patch_embed1.proj_conv", [1, 2])  # read by proj1_conv and the shortcut's proj_res_conv
    _remove(masks, model, "patch_embed2.proj3_conv", [0], rows=False)
    masked = _masked(model, masks)
    compaction = compact_checkpoint(masked)
    assert compaction.removed == {"heads": {"stage1.0": [0, 7], "stage2.0": [4], "stage3.0": [2]},
                                  "mlp": {"stage2.0": list(range(40))},
                                  "stem": {"patch_embed1.proj_conv": [1, 2], "patch_embed2.proj3_conv": [0]}}
    assert compaction.model.config.block_heads == (6, 7, 7)
    assert compaction.model.config.block_mlp_hidden == (64, 88, 256)
    assert compaction.model.config.stem_channels == (6, 31, 64)
    assert assert_same_spikes(masked, compaction, x) > 0


@pytest.mark.parametrize("preset, overrides", [
    (SDT, {}),
    ("sdt-2-256-cifar10dvs", dict(img_size=16, embed_dim=64, timesteps=2)),  # dvs_mode: erosion within a head
    (QK, {}),
    ("qkformer-2-256-dvs128", dict(img_size=32, embed_dim=64, num_heads=8, timesteps=2)),
    ("qkformer-10-384-imagenet", dict(img_size=32, depth=4, embed_dim=64, num_heads=4, timesteps=2)),
])
def test_firing_models_compact_exactly_on_every_variant(preset, overrides):
    model = firing(preset, **overrides)
    masks = _full(model)
    heads = [s for s in structure_sites(model) if s.kind == "heads"]
    mlps = [s for s in structure_sites(model) if s.kind == "mlp"]
    _remove(masks, model, heads[0].layer, [0])
    _remove(masks, model, heads[-1].layer, [1], rows=False)
    _remove(masks, model, mlps[-1].layer, list(range(5)))
    stem = [s for s in structure_sites(model) if s.kind == "stem"]
    for site in stem:  # every stage, QKFormer's shortcut-tapped units included
        _remove(masks, model, site.layer, [0, 1])
    _remove(masks, model, stem[-1].layer, [2], rows=False)
    masked = _masked(model, masks)
    compaction = compact_checkpoint(masked)
    assert sum(len(v) for v in compaction.removed["heads"].values()) == 2
    assert sum(len(v) for v in compaction.removed["mlp"].values()) >= 5
    assert sum(len(v) for v in compaction.removed["stem"].values()) >= 2 * len(stem) + 1
    cfg = model.config
    if cfg.variant == "dvs":
        x = torch.rand(3, cfg.timesteps, cfg.in_channels, cfg.img_size, cfg.img_size)
    else:
        x = torch.rand(3, cfg.in_channels, cfg.img_size, cfg.img_size) * 4
    assert assert_same_spikes(masked, compaction, x) > 0


def test_a_silent_sdt_mlp_channel_goes_and_one_its_batchnorm_fires_stays():
    model = firing(SDT)
    masks = _full(model)
    with torch.no_grad():
        masks["block.1.mlp.fc1_conv.weight"][10:14] = False
        model.block[1].mlp.fc1_bn.bias[10:14] = -20.0
        model.block[1].mlp.fc1_bn.bias[12] = 20.0  # fires every step with no weight: stays
    masked = _masked(model, masks)
    compaction = compact_checkpoint(masked)
    assert compaction.removed == {"mlp": {"block.1": [10, 11, 13]}}
    assert_same_spikes(masked, compaction, get_dataset("digits", "test").images[:32])


def test_an_sdt_mlp_cut_to_the_embedding_width_takes_no_hidden_shortcut():
    # the original adds the block's input to the hidden membrane when hidden == embed_dim (MLP ratio 1); a compacted
    # hidden width of 64 = embed_dim must not switch that on
    model = firing(SDT)
    masks = _full(model)
    _remove(masks, model, "block.0.mlp", list(range(192)))
    masked = _masked(model, masks)
    compaction = compact_checkpoint(masked)
    assert compaction.model.config.block_mlp_hidden == (64, 256)
    assert not compaction.model.block[0].mlp.hidden_shortcut
    assert_same_spikes(masked, compaction, get_dataset("digits", "test").images[:32] * 4)


# ------------------------------------------------------------------------------------------- IMP runs
TRAIN = TrainConfig(epochs=1, batch_size=256, eval_batch_size=512, warmup_epochs=0, eval_every=0, lr=5e-3, seed=3)
TINY = {SDT: dict(embed_dim=32, timesteps=2), QK: dict(embed_dim=32, timesteps=2)}


@pytest.fixture(scope="module")
def source_store(tmp_path_factory) -> Path:
    """`sdt` and `qk` (with @init): tiny digits models trained one epoch, with their training configuration."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("families") / "store"
    store = Store.open(root)
    for name, preset in (("sdt", SDT), ("qk", QK)):
        torch.manual_seed(0)
        model = create_model(preset, **TINY[preset])
        meta = {"arch": preset, "config": model.config.to_dict(), "selector": None, "train": TRAIN.to_dict()}
        for tag in ("init", "main"):  # main: after one epoch
            if tag == "main":
                fit(model, TRAIN, progress=False)
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            save_checkpoint(store, name, tag, Checkpoint(weights, {}, meta))
    return root


@pytest.fixture
def store(source_store, tmp_path) -> Store:
    shutil.copytree(source_store, tmp_path / "store")
    return Store.open(tmp_path / "store")


@pytest.mark.parametrize("name, preset, kinds, eligible", [
    ("sdt", SDT, ("heads", "mlp", "stem"), 2 * 8 + 2 * 128 + 4 + 8 + 16),
    ("qk", QK, ("heads", "mlp", "stem"), 3 * 8 + 32 + 64 + 128 + 4 + 16 + 32),
])
def test_one_channel_round_removes_the_exact_count_and_compacts(store, tmp_path, name, preset, kinds, eligible):
    settings = ImpSettings(rounds=1, target=0.5, epochs_per_round=1, granularity="channel")
    run_imp(store, name, "st", settings, progress=False)
    ticket = load_checkpoint("st@round-1", store)
    groups = structure_groups(create_model(preset, **TINY[preset]))
    assert {g.kind for g in groups} == set(kinds) and len(groups) == eligible
    imp = store.resolve("st@round-1").meta["imp"]
    assert imp["structures_eligible"] == eligible
    assert imp["structures_pruned"] == removal_count(eligible, 0.5) == sum(is_removed(g, ticket.masks) for g in groups)
    for members in by_layer(groups).values():  # never the last head or channel of a layer
        assert sum(not is_removed(g, ticket.masks) for g in members) >= 1
    whole = remove(M.full_masks(ticket.state_dict, ticket.masks), [g for g in groups if is_removed(g, ticket.masks)])
    assert all(torch.equal(whole[key], mask) for key, mask in ticket.masks.items())  # whole structures, nothing else

    outcome = run_compact(store, CompactSettings(ref="st@round-1", name="small"))
    removed = outcome.compaction.removed
    assert sum(len(v) for places in removed.values() for v in places.values()) >= imp["structures_pruned"]
    assert outcome.size_after < outcome.size_before
    assert outcome.compaction.params_after < outcome.compaction.params_before
    small = load_checkpoint("small", store)
    assert small.meta["compacted"]["from"] == "st@round-1"
    x = get_dataset("digits", "test").images[:32] * 30  # brighter: a one-epoch tiny model fires little on digits
    assert_same_spikes(ticket, outcome.compaction, x)
    rebuilt = build_model(small).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), outcome.compaction.model(x))

    folder = export_checkpoint("small", tmp_path / "export", store=store).folder
    card = (folder / "README.md").read_text()
    assert "- **compacted**: from st@round-1, removed " in card and "heads per block" in card
    again = build_model(load_checkpoint(str(folder), None)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), outcome.compaction.model(x))


def test_the_cli_compacts_a_qkformer_ticket_and_reports_its_widths(store):
    run_imp(store, "qk", "st", ImpSettings(rounds=1, target=0.3, epochs_per_round=1, granularity="channel",
                                           structures="heads"), progress=False)
    result = CliRunner().invoke(app, ["--store", str(store.root), "compact", "st@round-1", "--name", "small",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["stem_channels"] == [4, 16, 32] and doc["mlp_hidden_per_block"] == [32, 64, 128]
    assert sum(doc["heads_per_block"]) == 24 - removal_count(24, 0.3)
    assert doc["bytes_after"] < doc["bytes_before"]


def test_widths_round_trip_run_on_the_fast_paths_and_uniform_widths_change_nothing():
    for preset, widths in ((SDT, dict(block_heads=[3, 8], block_mlp_hidden=[5, 256], stem_channels=[3, 7, 20])),
                           (QK, dict(block_heads=[3, 8, 1], block_mlp_hidden=[5, 7, 9], stem_channels=[3, 5, 7]))):
        model = spkprune.create_model(preset, **widths)
        stored = json.loads(json.dumps(model.config.to_dict()))
        assert type(model.config).from_dict(stored) == model.config
        spkprune.create_model(preset, **stored).load_state_dict(model.state_dict(), strict=True)
        assert spkprune.get_config(preset).to_dict()["block_heads"] is None
    for preset, widths in ((SDT, dict(block_heads=[3, 8], block_mlp_hidden=[64, 200], stem_channels=[3, 7, 20])),
                           (QK, dict(block_heads=[3, 8, 1], block_mlp_hidden=[5, 7, 9], stem_channels=[3, 5, 7]))):
        model = firing(preset, **widths)
        x = torch.rand(2, 1, 8, 8) * 4
        with torch.no_grad():
            torch.testing.assert_close(fastpath.prepare_for_inference(model)(x), model(x), atol=1e-4, rtol=0)
        fastpath.prepare_for_training(model.train())
        model(x).sum().backward()
    uniform = spkprune.create_model(QK, block_heads=[8, 8, 8], block_mlp_hidden=[64, 128, 256])
    assert {k: v.shape for k, v in uniform.state_dict().items()} == \
        {k: v.shape for k, v in spkprune.create_model(QK).state_dict().items()}
    with pytest.raises(SpkpruneError, match="block_heads must be 3 whole numbers >= 1"):
        spkprune.get_config(QK, block_heads=[1, 2])
    with pytest.raises(SpkpruneError, match="stem_channels must be 3 whole numbers >= 1"):
        spkprune.get_config(SDT, stem_channels=[0, 4, 4])
    with pytest.raises(SpkpruneError, match="stem_channels must be 4 whole numbers >= 1"):  # DVS: 3 + 1 inner units
        spkprune.get_config("qkformer-2-256-dvs128", stem_channels=[4, 4, 4])


# ------------------------------------------------------------------------------ selectors and counting
@pytest.mark.parametrize("preset, location", [(SDT, 1), (QK, 2)])
def test_a_model_with_token_selectors_compacts_exactly(preset, location):
    from spkprune.models.selector import attach_selectors, selector_config

    model = firing(preset)
    attach_selectors(model, {"locations": [location], "keep": 0.7, "scorer": "learned"})
    model.eval()
    masks = _full(model)
    heads = [s for s in structure_sites(model) if s.kind == "heads"]
    _remove(masks, model, heads[-1].layer, [0, 3])
    masked = _masked(model, masks)
    masked.meta["selector"] = selector_config(model)
    compaction = compact_checkpoint(masked)
    assert compaction.checkpoint.meta["selector"] == selector_config(model)
    assert assert_same_spikes(masked, compaction, get_dataset("digits", "test").images[:32] * 4) > 0


@pytest.mark.skipif(not all(FAMILIES[f].counted for f in ("sdt", "qkformer")),
                    reason="flops report counts these families once counting/ covers them")
@pytest.mark.parametrize("preset", [SDT, QK])
def test_flops_report_counts_the_compacted_model(preset):
    from spkprune.counting import count_operations

    model = firing(preset)
    masks = _full(model)
    for site in structure_sites(model):
        if site.kind != "stem":
            _remove(masks, model, site.layer, list(range(site.units // 2)))
    masked = _masked(model, masks)
    compaction = compact_checkpoint(masked)
    small = count_operations(compaction.model, masks=compaction.checkpoint.masks)
    dense = count_operations(build_model(masked).eval(), masks=masked.masks)
    assert small["totals"]["dense_macs"] < dense["totals"]["dense_macs"]
    assert small["totals"]["nonzero_macs"] == pytest.approx(dense["totals"]["nonzero_macs"], rel=0.02)
