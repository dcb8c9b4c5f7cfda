"""`spkprune sensitivity`: one unit pruned at a time, the stored scan, and the allocations drawn from it
(`imp --allocation sensitivity`, `select-tokens --keep-allocation sensitivity`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, load_artifact, save_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.models import create_model
from spkprune.pruning import masks as M
from spkprune.pruning.granularity import AllocatedPruning, pruning_strategy
from spkprune.pruning.settings import ImpSettings
from spkprune.pruning.structures import structure_groups
from spkprune.sensitivity.allocation import Curve, allocate, location_keep, non_decreasing, predicted_drop
from spkprune.sensitivity.jobs import run_sensitivity
from spkprune.sensitivity.scan import LayerProbes, LocationProbes, StructureProbes
from spkprune.sensitivity.settings import SensitivitySettings
from spkprune.store import Store
from spkprune.training import TrainConfig

DIGITS = "spikformer-2-64-digits"


@pytest.fixture
def store(tmp_path: Path, one_thread) -> Store:
    """`dense` (main and init): an untrained digits Spikformer with a training configuration."""
    store = Store.open(tmp_path / "store")
    torch.manual_seed(0)
    model = create_model(DIGITS)
    meta = {"arch": DIGITS, "config": model.config.to_dict(), "selector": None, "train": TrainConfig().to_dict()}
    for tag in ("init", "main"):
        save_checkpoint(store, "dense", tag, Checkpoint(model.state_dict(), {}, meta))
    return store


def _dense_weights():
    torch.manual_seed(0)
    model = create_model(DIGITS)
    state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return model, state_dict, M.full_masks(state_dict, model.prunable_weights())


# --------------------------------------------------------------------------------------------------- probes
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_a_layer_probe_prunes_exactly_its_share_of_that_layer_only(ratio):
    model, state_dict, masks = _dense_weights()
    probes = LayerProbes(state_dict, masks)
    for unit in probes.units():
        pruned = probes.apply(model, unit, ratio)
        weights = model.state_dict()
        assert pruned == M.pruned_count(unit.size, ratio)
        assert int((weights[unit.name] == 0).sum()) == pruned
        assert all(torch.equal(weights[key], state_dict[key]) for key in masks if key != unit.name)
        probes.restore(model)
        assert all(torch.equal(model.state_dict()[key], state_dict[key]) for key in state_dict)


def test_a_structure_probe_removes_whole_heads_and_always_leaves_one():
    model, state_dict, masks = _dense_weights()
    probes = StructureProbes(model, state_dict, masks)
    names = [unit.name for unit in probes.units()]
    assert "heads block.0.attn" in names and "mlp block.1.mlp" in names
    heads = next(unit for unit in probes.units() if unit.name == "heads block.0.attn")
    assert probes.apply(model, heads, 0.5) == 2 and probes.apply(model, heads, 0.99) == heads.size - 1
    q = model.state_dict()["block.0.attn.q_linear.weight"]
    width = q.shape[0] // heads.size
    zero_heads = [h for h in range(heads.size) if not q[h * width:(h + 1) * width].any()]
    assert len(zero_heads) == heads.size - 1


# ----------------------------------------------------------------------------------------------- the scan
def test_the_scan_records_every_layer_and_ratio_and_an_unpruned_probe_costs_nothing(store, tmp_path):
    settings = SensitivitySettings(ref="dense", ratios="1e-9,0.5", samples=48, plot=tmp_path / "s.png")
    report = run_sensitivity(store, settings)
    rows = report.scan["rows"]
    keys = list(create_model(DIGITS).prunable_weights())
    assert [(row["unit"], row["ratio"]) for row in rows] == [(key, r) for key in keys for r in (1e-9, 0.5)]
    for row in rows:
        assert row["drop"] == pytest.approx(report.scan["base_top1"] - row["top1"], abs=1e-12)
        if row["ratio"] == 1e-9:
            assert row["pruned"] == 0 and row["drop"] == 0
    stored = store.resolve("dense@sensitivity-layers")
    assert stored.kind == "sensitivity" and stored.parent == "dense@main" and stored.meta["sensitivity"] == report.scan
    assert report.scan["images"] == 48 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert report.table()["drop @0.5"].notna().all()


def test_a_location_scan_drops_tokens_before_one_block(store):
    report = run_sensitivity(store, SensitivitySettings(ref="dense", over="locations", ratios="0.5,0.99", samples=32))
    assert [(row["unit"], row["pruned"]) for row in report.scan["rows"]] == [("block 1", 8), ("block 1", 15)]
    assert store.exists("dense", "sensitivity-locations") and report.plot.exists()


@pytest.mark.parametrize("ratios, message", [("0,0.5", r"--ratios: must be > 0"), ("0.5,1", r"--ratios: must be < 1"),
                                              ("", r"--ratios: give one or more ratios")])
def test_ratios_outside_zero_one_are_one_line(ratios, message):
    with pytest.raises(SpkpruneError, match=message):
        SensitivitySettings.parse({"ref": "dense", "ratios": ratios}, style="flag")


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "md"])
def test_cli_formats(store, fmt):
    args = ["--store", str(store.root), "sensitivity", "dense", "--over", "locations", "--ratios", "0.5,0.75",
            "--samples", "16", "--format", fmt]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.stdout
    if fmt == "json":
        doc = json.loads(out)
        assert [row["ratio"] for row in doc["rows"]] == [0.5, 0.75] and doc["stored"] == "dense@sensitivity-locations"
    elif fmt == "csv":
        assert out.splitlines()[0] == "unit,size,ratio,pruned,sparsity,top1,drop" and len(out.splitlines()) == 3
    elif fmt == "md":
        assert out.startswith("| unit | size | drop @0.5 | drop @0.75 |") and "**stored**: dense@sensitivity" in out
    else:
        assert "block 1" in out and "stored: dense@sensitivity-locations" in out


# ------------------------------------------------------------------------------------------------ allocation
def _curves():
    """Three layers of 1000 weights; `b` loses 50 points at half sparsity, the others almost nothing."""
    flat = [(0.5, 0.0), (0.8, 0.01), (0.9, 0.02), (0.95, 0.05)]
    steep = [(0.5, 0.5), (0.8, 0.7), (0.9, 0.8), (0.95, 0.85)]
    return {name: Curve.of(1000, points, worst=0.9) for name, points in (("a", flat), ("b", steep), ("c", flat))}


@pytest.mark.parametrize("budget", [0, 1, 1234, 1800, 2100, 2997])
def test_allocation_prunes_exactly_the_budget_and_spares_the_sensitive_layer(budget):
    curves = _curves()
    counts = allocate(curves, budget)
    assert sum(counts.values()) == budget and all(0 <= counts[k] <= curves[k].cap for k in counts)
    if budget <= 1900:  # the flat layers take everything up to 95 % before the steep one loses a weight
        assert counts["b"] == 0
    uniform = {key: budget // 3 + (i < budget % 3) for i, key in enumerate(curves)}
    assert predicted_drop(curves, counts) <= predicted_drop(curves, uniform) + 1e-12


def test_a_budget_beyond_every_layers_last_weight_is_refused():
    with pytest.raises(SpkpruneError, match="cannot prune 2998 entries: the scanned units allow at most 2997"):
        allocate(_curves(), 2998)


def test_a_larger_budget_prunes_everything_a_smaller_one_does():
    curves = _curves()
    previous = {key: 0 for key in curves}
    for budget in range(0, 2999, 97):
        counts = allocate(curves, budget)
        assert all(counts[key] >= previous[key] for key in curves)
        previous = counts


def test_non_decreasing_keeps_the_sum():
    assert non_decreasing([5, 0, 3]) == [2, 3, 3]
    assert non_decreasing([0, 4, 9]) == [0, 4, 9]
    assert sum(non_decreasing([7, 1, 1, 0])) == 9


def test_keep_per_location_drops_as_many_tokens_as_uniform_and_spares_the_sensitive_location():
    rows = []
    for location, drops in ((1, (0.4, 0.6, 0.8)), (2, (0.0, 0.01, 0.02)), (3, (0.0, 0.0, 0.01))):
        rows += [{"unit": f"block {location}", "size": 16, "cap": 15, "sparsity": s, "drop": d}
                 for s, d in zip((0.25, 0.5, 0.75), drops)]
    scan = {"source": "x@main", "rows": rows, "base_top1": 0.95, "chance": 0.1}
    keep = location_keep(scan, 0.7, [1, 2, 3])
    uniform_dropped = sum(16 - int(16 * 0.7 ** i + 1e-9) for i in (1, 2, 3))
    assert sum(16 - round(16 * k) for k in keep) == uniform_dropped
    # blocks 2 and 3 drop up to 75 % almost for free; the one token left over costs least at block 1
    assert keep == [15 / 16, 4 / 16, 4 / 16] and keep[0] > 0.7


def _scan_with_a_sensitive_layer(store: Store, sensitive: str) -> None:
    keys = list(create_model(DIGITS).prunable_weights())
    weights = load_artifact(store, store.resolve("dense")).state_dict
    rows = []
    for key in keys:
        size = weights[key].numel()
        for ratio in (0.5, 0.9, 0.95):
            drop = 0.5 * ratio if key == sensitive else 0.01 * ratio
            rows.append({"unit": key, "size": size, "cap": size - 1, "ratio": ratio,
                         "pruned": M.pruned_count(size, ratio), "sparsity": M.pruned_count(size, ratio) / size,
                         "top1": 0.9 - drop, "drop": drop})
    scan = {"source": "dense@main", "over": "layers", "base_top1": 0.9, "chance": 0.1, "rows": rows}
    store.put("dense", "sensitivity-layers", {}, {}, {"sensitivity": scan}, kind="sensitivity", parent="dense@main")


def test_imp_allocation_reaches_the_global_count_and_spares_the_sensitive_layer(store):
    sensitive = "block.1.mlp.fc1_linear.weight"
    _scan_with_a_sensitive_layer(store, sensitive)
    art = store.resolve("dense")
    model = create_model(DIGITS)
    eligible = list(model.prunable_weights())
    pruning = pruning_strategy(ImpSettings(allocation="sensitivity"), structure_groups(model), eligible, store, art)
    assert isinstance(pruning, AllocatedPruning)
    weights = load_artifact(store, art).state_dict
    masks = M.full_masks(weights, eligible)
    total = sum(mask.numel() for mask in masks.values())
    for level in (0.5, 0.9):
        masks = pruning.prune(weights, masks, level)
        assert M.count_pruned(masks) == M.pruned_count(total, level)
    sparsity = M.layer_sparsity(masks)
    alike = [key for key in eligible if key != sensitive and masks[key].numel() == masks[sensitive].numel()]
    assert len(alike) == 3 and all(sparsity[sensitive] < sparsity[key] for key in alike)  # the other MLP layers
    assert pruning.describe(masks)["allocation"]["layer_sparsity"][sensitive] == sparsity[sensitive]
    assert set(pruning.describe({})["allocation"]["layer_sparsity"].values()) == {0.0}  # round 0: nothing pruned


def test_imp_allocation_without_a_scan_says_what_to_run(store):
    model = create_model(DIGITS)
    with pytest.raises(SpkpruneError, match=r"run spkprune sensitivity dense@main --over layers first"):
        pruning_strategy(ImpSettings(allocation="sensitivity"), [], list(model.prunable_weights()), store,
                         store.resolve("dense"))


def test_the_allocation_keeps_the_run_identity_of_a_uniform_run():
    assert "allocation" not in ImpSettings().to_dict()
    assert ImpSettings(allocation="sensitivity").to_dict()["allocation"] == "sensitivity"
    with pytest.raises(SpkpruneError, match="applies with granularity weight and scope global"):
        ImpSettings(allocation="sensitivity", scope="layerwise")


@pytest.mark.slow
def test_imp_with_the_allocation_end_to_end(tmp_path, one_thread):
    store = Store.open(tmp_path / "store")
    torch.manual_seed(0)
    model = create_model(DIGITS)
    train = TrainConfig(epochs=1, limit_train_batches=2, warmup_epochs=0).to_dict()
    meta = {"arch": DIGITS, "config": model.config.to_dict(), "selector": None, "train": train}
    for tag in ("init", "main"):
        save_checkpoint(store, "dense", tag, Checkpoint(model.state_dict(), {}, meta))
    run = lambda *args: CliRunner().invoke(app, ["--store", str(store.root), *args])
    assert run("sensitivity", "dense", "--ratios", "0.5,0.9", "--samples", "32").exit_code == 0
    result = run("imp", "dense", "--name", "t", "--rounds", "2", "--target", "0.8", "--allocation", "sensitivity",
                 "--no-progress", "--format", "json")
    assert result.exit_code == 0, result.output
    eligible = list(model.prunable_weights())
    total = sum(model.prunable_weights()[key].numel() for key in eligible)
    for k, level in ((1, M.sparsity_schedule(2, target=0.8)[0]), (2, 0.8)):
        ckpt = load_artifact(store, store.resolve(f"t@round-{k}"))
        assert M.count_pruned(ckpt.masks) == M.pruned_count(total, level)
        allocation = ckpt.meta["imp"]["allocation"]
        assert allocation["scan"] == "dense@sensitivity-layers" and set(allocation["layer_sparsity"]) == set(eligible)
    settings = store.resolve("t@round-2").meta["imp"]["settings"]
    assert settings["allocation"] == "sensitivity"
    assert settings["allocation_scan_sha256"] == store.resolve("dense@sensitivity-layers").sha256
    assert run("sensitivity", "dense", "--ratios", "0.5,0.8", "--samples", "32").exit_code == 0  # another scan
    again = run("imp", "dense", "--name", "t", "--rounds", "2", "--target", "0.8", "--allocation", "sensitivity")
    assert again.exit_code == 2 and "allocation_scan_sha256: stored" in again.output


@pytest.mark.parametrize("preset", ["sdt-2-64-digits", "qkformer-3-64-digits"])
def test_structure_and_location_probes_work_on_the_other_families(preset, one_thread):
    torch.manual_seed(0)
    model = create_model(preset).eval()
    state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}
    structures = StructureProbes(model, state_dict, M.full_masks(state_dict, model.prunable_weights()))
    heads = next(unit for unit in structures.units() if unit.name.startswith("heads"))
    assert structures.apply(model, heads, 0.5) == heads.size // 2
    structures.restore(model)
    locations = LocationProbes(model, state_dict)
    assert [unit.name for unit in locations.units()] == [f"block {b}" for b in model.selector_locations()]
    unit = locations.units()[0]
    assert locations.apply(model, unit, 0.5) == unit.size - int(unit.size * 0.5)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    locations.restore(model)
    assert not len(model.token_selectors)
