"""Structured pruning (`spkprune imp --granularity channel`): the structures and the slices they own, exact removal,
exact counts, never the last head or channel of a layer, global vs layerwise, importance, `--rewind none`, chains with
weight pruning, the run identity, the CLI end to end and bad input.

The IMP runs use a tiny digits Spikformer (32 channels, 4 heads, T=2, one epoch at batch 256): a round takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spkprune.checkpoint import load_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.models import create_model
from spkprune.pruning import imp as imp_mod
from spkprune.pruning import masks as M
from spkprune.pruning.granularity import WeightPruning
from spkprune.pruning.imp import ImpSettings, run_imp
from spkprune.pruning.structured import removal_count, structured_masks
from spkprune.pruning.structures import (
    by_layer,
    is_removed,
    owned_values,
    remove,
    removed_structures,
    structure_groups,
)
from spkprune.store import Store
from storekit import DIGITS, copied_store, trained_source

TINY = dict(timesteps=2, embed_dim=32, num_heads=4)

pytestmark = pytest.mark.usefixtures("one_thread")


def _full_masks(model) -> dict[str, torch.Tensor]:
    return M.full_masks(model.state_dict(), model.prunable_weights())


# ------------------------------------------------------------------------------------------ the structures
@pytest.mark.parametrize("preset, overrides", [
    (DIGITS, {}),
    ("spikformer-2-256-dvs128", dict(embed_dim=64, num_heads=4, img_size=32)),
    ("spikformer-8-384-imagenet", dict(depth=1, embed_dim=64, num_heads=4, img_size=32)),
])
def test_groups_of_every_kind_own_the_coupled_slices(preset, overrides):
    model = create_model(preset, **overrides)
    cfg, weights = model.config, model.state_dict()
    groups = structure_groups(model)
    counts = {kind: sum(g.kind == kind for g in groups) for kind in ("heads", "mlp", "stem")}
    dim = cfg.embed_dim
    assert counts == {"heads": cfg.depth * cfg.num_heads, "mlp": cfg.depth * dim * cfg.mlp_ratio,
                      "stem": dim // 8 + dim // 4 + dim // 2}
    width = dim // cfg.num_heads
    for group in groups:
        rows = [p for p in group.weights if p.dim == 0]
        columns = [p for p in group.weights if p.dim == 1]
        size = width if group.kind == "heads" else 1
        assert all(p.stop - p.start == size for p in group.weights + group.norms)
        assert all(p.start == group.index * size for p in group.weights + group.norms)
        for piece in group.weights:
            part = weights[piece.key][piece.index()]
            assert part.shape[piece.dim] == size and part.numel() == size * weights[piece.key].numel() // \
                weights[piece.key].shape[piece.dim]
        names = sorted(p.key.rsplit(".", 2)[-2] for p in rows + columns)
        if group.kind == "heads":
            assert [n[0] for n in names] == ["k", "p", "q", "v"] and columns[0].key.split(".")[3].startswith("proj")
            assert {p.key.split(".")[3][:1] for p in rows} == {"q", "k", "v"}
        elif group.kind == "mlp":
            assert rows[0].key.split(".")[3].startswith("fc1") and columns[0].key.split(".")[3].startswith("fc2")
        else:
            stage = rows[0].key.split(".")[1]
            following = {"proj_conv": "proj_conv1", "proj_conv1": "proj_conv2", "proj_conv2": "proj_conv3"}
            assert columns[0].key == f"patch_embed.{following[stage]}.weight" and group.layer == f"patch_embed.{stage}"
        assert [p.key.replace("_bn", "_").split(".")[-2][:2] for p in group.norms] == \
            [p.key.split(".")[-2][:2] for p in rows]
    # the slices of one (tensor, dimension) tile it exactly: every channel belongs to exactly one structure
    tiles: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for group in groups:
        for piece in group.weights:
            tiles.setdefault((piece.key, piece.dim), []).append((piece.start, piece.stop))
    for (key, d), spans in tiles.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == weights[key].shape[d]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), key
    touched = {key for key, _ in tiles}
    assert not {"head.weight", "patch_embed.rpe_conv.weight"} & touched  # the embedding width is not a structure
    assert ("patch_embed.proj_conv3.weight", 0) not in tiles


@torch.no_grad()
def test_a_removed_structure_reaches_nothing_downstream():
    """Masking a head, an MLP channel and a stem channel: whatever their neurons fire (here, BatchNorm biases that
    make them fire all the time) the logits do not change, because the consumer columns are masked too."""
    torch.manual_seed(0)
    model = create_model(DIGITS)
    images = torch.rand(6, 1, 8, 8)
    for module in model.modules():  # running statistics of these images, so that spikes flow at initialisation
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    model.train()(images)
    model.eval()
    groups = structure_groups(model)
    chosen = [next(g for g in groups if (g.kind, g.layer, g.index) == spot) for spot in
              [("heads", "block.0.attn", 1), ("mlp", "block.1.mlp", 3), ("stem", "patch_embed.proj_conv1", 2)]]
    masks = remove(_full_masks(model), chosen)

    def logits(state, masks, loud: bool) -> torch.Tensor:
        state = M.apply_masks(state, masks)
        if loud:
            state = dict(state)
            for group in chosen:
                for piece in group.norms:
                    bias = piece.key.replace(".weight", ".bias")
                    state[bias] = state[bias].clone()
                    state[bias][piece.index()] += 5.0
        model.load_state_dict(state)
        return model(images)

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    quiet = logits(weights, masks, loud=False)
    assert quiet.abs().sum() > 0 and torch.equal(quiet, logits(weights, masks, loud=True))
    # Masking the producer rows alone is not enough: the loud neurons then reach the logits.
    rows_only = remove(_full_masks(model), [])
    for group in chosen:
        for piece in group.weights:
            if piece.dim == 0:
                rows_only[piece.key][piece.index()] = False
    assert not torch.equal(logits(weights, rows_only, loud=False), logits(weights, rows_only, loud=True))
    assert removed_structures(groups, masks) == {"stem": {"patch_embed.proj_conv1": [2]},
                                                 "heads": {"block.0": [1]}, "mlp": {"block.1": [3]}}


# ------------------------------------------------------------------------------------------------ the masks
def test_exact_counts_per_level_masks_only_shrink_and_a_layer_keeps_one():
    torch.manual_seed(1)
    model = create_model(DIGITS)
    weights = model.state_dict()
    groups = structure_groups(model)
    masks = _full_masks(model)
    for level in M.sparsity_schedule(4, target=0.8):
        new = structured_masks(groups, weights, masks, level)
        assert sum(is_removed(g, new) for g in groups) == removal_count(len(groups), level)
        assert all(not (new[k] & ~masks[k]).any() for k in masks)
        assert all(any(not is_removed(g, new) for g in members) for members in by_layer(groups).values())
        masks = new
    heads = [g for g in groups if g.kind == "heads"]  # 2 blocks of 4 heads: at most 3 of each can go
    full = structured_masks(heads, weights, _full_masks(model), 0.75)
    assert {layer: len(i) for layer, i in removed_structures(heads, full)["heads"].items()} == \
        {"block.0": 3, "block.1": 3}
    for scope, message in (("global", r"would remove 7 of the 8 structures \(heads\).*at most 6 can go"),
                           ("layerwise", r"would remove every head of block\.0\.attn \(4 of 4\)")):
        with pytest.raises(SpkpruneError, match=message):
            structured_masks(heads, weights, _full_masks(model), 0.9, scope)


def test_global_ranking_follows_the_weights_and_layerwise_takes_the_same_share_of_every_layer():
    torch.manual_seed(2)
    model = create_model(DIGITS)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for key in ("q_linear", "k_linear", "v_linear"):  # block 0: heads 0-2 tiny, head 3 large
        weights[f"block.0.attn.{key}.weight"][:48] *= 1e-3
    weights["block.0.attn.proj_linear.weight"][:, :48] *= 1e-3
    heads = [g for g in structure_groups(model) if g.kind == "heads"]
    found = {}
    for scope in ("global", "layerwise"):
        masks = structured_masks(heads, weights, _full_masks(model), 0.375, scope)  # 3 of 8 heads
        found[scope] = removed_structures(heads, masks)["heads"]
    assert found["global"] == {"block.0": [0, 1, 2]}
    assert {layer: len(i) for layer, i in found["layerwise"].items()} == {"block.0": 2, "block.1": 2}
    assert set(found["layerwise"]["block.0"]) < {0, 1, 2}


def test_batchnorm_importance_removes_the_channels_with_the_smallest_scales():
    torch.manual_seed(3)
    model = create_model(DIGITS)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["block.1.mlp.fc1_bn.weight"][5:10] = 1e-3
    mlp = [g for g in structure_groups(model) if g.kind == "mlp"]
    masks = structured_masks(mlp, weights, _full_masks(model), 5 / len(mlp), "global", "bn")
    assert removed_structures(mlp, masks)["mlp"] == {"block.1": [5, 6, 7, 8, 9]}


def test_weight_pruning_of_a_structured_source_keeps_what_is_pruned_beyond_the_level():
    torch.manual_seed(4)
    model = create_model(DIGITS)
    weights, keys = model.state_dict(), list(model.prunable_weights())
    mlp = [g for g in structure_groups(model) if g.kind == "mlp"]
    source = structured_masks(mlp, weights, _full_masks(model), 0.6, "layerwise")  # fc1 and fc2: 60 % pruned
    weights = M.apply_masks(weights, source)
    for scope in ("layerwise", "global"):
        pruning = WeightPruning(keys, scope, structure_groups(model))
        masks = pruning.prune(weights, source, 0.3)
        assert all(not (masks[k] & ~source[k]).any() for k in keys)
        if scope == "global":  # 24.6 % pruned already, so the level is reached exactly
            assert M.count_pruned(masks) == M.pruned_count(sum(m.numel() for m in masks.values()), 0.3)
            continue
        for key in keys:
            share = M.count_pruned({key: masks[key]}) / masks[key].numel()
            if "mlp" in key:  # pruned beyond 0.3 already: unchanged
                assert torch.equal(masks[key], source[key])
            else:
                assert share == pytest.approx(0.3, abs=1 / masks[key].numel())
    unchanged = WeightPruning(keys, "global", structure_groups(model)).prune(weights, source, 0.2)
    assert M.mask_checksum(unchanged) == M.mask_checksum(source)  # a level below what is pruned changes nothing
    assert pruning.describe(source)["structures_removed"]["mlp"] == removed_structures(mlp, source)["mlp"]


def test_the_identity_of_weight_runs_is_the_one_older_stores_recorded():
    old = ["rounds", "target", "rate", "scope", "exclude", "rewind", "epochs_per_round", "search_timesteps", "seed"]
    assert list(ImpSettings(rounds=2, granularity="weight").to_dict()) == old
    channel = ImpSettings(rounds=2, granularity="channel").to_dict()
    assert list(channel) == [*old, "granularity"] and channel["granularity"] == "channel"
    chosen = ImpSettings(rounds=2, granularity="channel", structures="stem,heads", importance="bn").to_dict()
    assert chosen["structures"] == ["heads", "stem"] and chosen["importance"] == "bn"
    with pytest.raises(SpkpruneError, match="structures only apply with granularity channel"):
        ImpSettings(structures="heads")


# ---------------------------------------------------------------------------------------------- IMP runs
@pytest.fixture(scope="module")
def source_store(tmp_path_factory) -> Path:
    return trained_source(tmp_path_factory.mktemp("structured") / "store", TINY)


@pytest.fixture
def store(source_store, tmp_path) -> Store:
    return copied_store(source_store, tmp_path)


def _snapshot(store: Store) -> list[tuple[str, str]]:
    return [(a.ref, a.sha256) for a in store.list()]


def _groups(kinds=("heads", "mlp", "stem")):
    return [g for g in structure_groups(create_model(DIGITS, **TINY)) if g.kind in kinds]


def test_cli_channel_run_end_to_end(store):
    args = ["--store", str(store.root), "imp", "src", "--granularity", "channel", "--structures", "heads,mlp",
            "--rounds", "2", "--target", "0.5", "--epochs-per-round", "1", "--name", "st", "--no-progress",
            "--format", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [row["round"] for row in doc["rows"]] == [0, 1, 2] and doc["final"] == "st@round-2"
    groups = _groups(("heads", "mlp"))  # 2 x 4 heads + 2 x 128 MLP channels
    previous = None
    for k, level in enumerate(M.sparsity_schedule(2, target=0.5), start=1):
        ckpt = load_checkpoint(f"st@round-{k}", store)
        imp = store.resolve(f"st@round-{k}").meta["imp"]
        assert imp["granularity"] == "channel" and imp["settings"]["granularity"] == "channel"
        assert imp["structures_pruned"] == removal_count(len(groups), level) == sum(is_removed(g, ckpt.masks)
                                                                                    for g in groups)
        assert imp["structures_eligible"] == len(groups) == 264
        assert imp["structures_removed"] == removed_structures(_groups(), ckpt.masks)
        assert "stem" not in imp["structures_removed"] and imp["rewind"] == "src@init"
        assert all((ckpt.state_dict[key][~mask] == 0).all() for key, mask in ckpt.masks.items())
        owned = sum(owned_values(g, ckpt.masks).numel() for g in groups if is_removed(g, ckpt.masks))
        assert M.count_pruned(ckpt.masks) == owned  # whole structures and nothing else
        assert doc["rows"][k]["remaining_prunable"] == sum(m.numel() for m in ckpt.masks.values()) - owned
        if previous is not None:
            assert all(not (ckpt.masks[key] & ~previous[key]).any() for key in previous)
        previous = ckpt.masks
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout)["nothing_to_do"]


def test_rewind_none_continues_from_the_round_before_and_the_random_control_keeps_the_layer_counts(store,
                                                                                                    monkeypatch):
    starts = []
    real_fit = imp_mod.fit

    def spy(model, cfg, **kwargs):
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_fit(model, cfg, **kwargs)

    monkeypatch.setattr(imp_mod, "fit", spy)
    settings = ImpSettings(rounds=2, target=0.4, epochs_per_round=1, granularity="channel", rewind="none",
                           scope="layerwise")
    run_imp(store, "src", "t", settings, control="random-prune", progress=False)
    for k, start in enumerate(starts[:2], start=1):
        before = load_checkpoint(f"t@round-{k - 1}", store).state_dict
        assert all(torch.equal(start[key], before[key]) for key in before)
        assert store.resolve(f"t@round-{k}").meta["imp"]["rewind"] == f"t@round-{k - 1}"
    groups = _groups()
    for k in (1, 2):
        ticket, control = (load_checkpoint(f"t@{tag}round-{k}", store).masks for tag in ("", "random-prune-"))
        assert M.mask_checksum(ticket) != M.mask_checksum(control)
        for members in by_layer(groups).values():
            wanted = removal_count(len(members), settings.levels()[k - 1])
            assert sum(is_removed(g, ticket) for g in members) == sum(is_removed(g, control) for g in members) == wanted


def test_weight_and_channel_pruning_follow_each_other(store):
    """structured -> unstructured and unstructured -> structured: masks only shrink, structures stay removed."""
    groups = _groups()
    one = dict(rounds=1, epochs_per_round=1)
    run_imp(store, "src", "st", ImpSettings(target=0.3, granularity="channel", **one), progress=False)
    run_imp(store, "st@round-1", "w", ImpSettings(target=0.6, **one), progress=False)
    structured, then_weights = load_checkpoint("st@round-1", store), load_checkpoint("w@round-1", store)
    assert load_checkpoint("w@round-0", store).masks.keys() == structured.masks.keys()
    assert all(not (then_weights.masks[k] & ~structured.masks[k]).any() for k in structured.masks)
    eligible = sum(m.numel() for m in then_weights.masks.values())
    assert M.count_pruned(then_weights.masks) == round(0.6 * eligible)
    listed = store.resolve("w@round-1").meta["imp"]["structures_removed"]  # the weight run still says what is gone
    gone = removed_structures(groups, structured.masks)
    assert gone
    for kind, layers in gone.items():
        assert all(set(indices) <= set(listed[kind][layer]) for layer, indices in layers.items())
    assert store.resolve("w@round-1").meta["imp"]["rewind"] == "src@init"  # rewinds through the lineage

    run_imp(store, "src", "wt", ImpSettings(target=0.5, **one), progress=False)
    run_imp(store, "wt@round-1", "ch", ImpSettings(target=0.4, granularity="channel", **one), progress=False)
    weights, then_channels = load_checkpoint("wt@round-1", store), load_checkpoint("ch@round-1", store)
    assert all(not (then_channels.masks[k] & ~weights.masks[k]).any() for k in weights.masks)
    assert sum(is_removed(g, then_channels.masks) for g in groups) == removal_count(len(groups), 0.4)


def test_a_level_that_needs_every_head_of_a_layer_is_refused_before_any_work(store):
    before = _snapshot(store)
    for scope, message in (("global", "at most 6 can go"), ("layerwise", "every head of block.0.attn")):
        settings = ImpSettings(rounds=2, target=0.9, granularity="channel", structures="heads", scope=scope)
        with pytest.raises(SpkpruneError, match=message):
            run_imp(store, "src", "t", settings, progress=False)
    assert _snapshot(store) == before
