"""`spkprune imp --one-shot`: one round straight to the target from the source's weights, no rewind, no retraining,
BatchNorm recalibrated on a few training batches, optionally fine-tuned; stored like an IMP round.

The source is a tiny digits Spikformer (32 channels, T=2, one epoch at batch 256), as in tests/test_imp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, build_model, load_checkpoint
from spkprune.cli import app
from spkprune.data import get_dataset, make_loader
from spkprune.models import create_model
from spkprune.pruning import masks as M
from spkprune.pruning.imp import ImpSettings, run_imp
from spkprune.store import Store
from spkprune.training import evaluate
from spkprune.training.recalibrate import batchnorms, recalibrate_batchnorm
from storekit import TRAIN, copied_store, snapshot, trained_source

TINY = dict(timesteps=2, embed_dim=32, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source_store(tmp_path_factory) -> Path:
    return trained_source(tmp_path_factory.mktemp("oneshot") / "store", TINY)


@pytest.fixture
def store(source_store, tmp_path) -> Store:
    return copied_store(source_store, tmp_path)


def _is_bn_statistic(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _pruned_source(store: Store, masks) -> torch.nn.Module:
    """The source with `masks` applied and nothing else changed."""
    source = load_checkpoint("src", store)
    weights = {k: v * masks[k] if k in masks else v.clone() for k, v in source.state_dict.items()}
    return build_model(Checkpoint(weights, {}, source.meta, "src"))


def test_one_shot_prunes_exactly_keeps_the_dense_weights_and_recalibrates_batchnorm(store):
    report = run_imp(store, "src", "os", ImpSettings(one_shot=True, target=0.5, recalibrate_batches=2), progress=False)
    assert [(r.round, r.kind) for r in report.rows] == [(0, "ticket"), (1, "ticket")]
    source, ckpt = load_checkpoint("src", store), load_checkpoint("os@round-1", store)
    prunable = list(create_model("spikformer-2-64-digits", **TINY).prunable_weights())
    total = sum(source.state_dict[k].numel() for k in prunable)
    assert set(ckpt.masks) == set(prunable) and M.count_pruned(ckpt.masks) == int(total * 0.5 + 0.5)
    dense_masks = M.magnitude_masks(source.state_dict, M.full_masks(source.state_dict, prunable), 0.5, "global")
    assert M.mask_checksum(ckpt.masks) == M.mask_checksum(dense_masks)  # by magnitude of the dense weights
    for key, value in ckpt.state_dict.items():
        if key in ckpt.masks:  # kept entries are the dense weights, pruned ones zero
            assert torch.equal(value, source.state_dict[key] * ckpt.masks[key]), key
        elif not _is_bn_statistic(key):
            assert torch.equal(value, source.state_dict[key]), key

    # The BatchNorm statistics are those a direct recalibration of the pruned source on the same batches gives.
    model = _pruned_source(store, ckpt.masks)
    train = get_dataset("digits", "train", timesteps=2, augment=False)
    recalibrate_batchnorm(model, make_loader(train, TRAIN.batch_size, train=True, seed=TRAIN.seed, distributed=False), 2)
    stats = [key for key in ckpt.state_dict if key.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(ckpt.state_dict[k], model.state_dict()[k]) for k in stats)
    assert any(not torch.equal(ckpt.state_dict[k], source.state_dict[k]) for k in stats)

    art = store.resolve("os@round-1")
    assert art.parent == "os@round-0"
    imp = art.meta["imp"]
    assert imp["settings"]["one_shot"] is True and imp["settings"]["recalibrate_batches"] == 2
    assert (imp["round"], imp["level"], imp["rewind"], imp["kind"]) == (1, 0.5, "os@round-0", "ticket")
    assert imp["settings"]["rounds"] == 1 and imp["settings"]["rewind"] == "none"
    assert art.meta["train"] == TRAIN.to_dict()
    test = get_dataset("digits", "test", timesteps=2, augment=False)
    assert art.meta["metrics"]["top1"] == pytest.approx(evaluate(model, test, 512, record_firing=False)["top1"])

    before = snapshot(store)
    again = run_imp(store, "src", "os", ImpSettings(one_shot=True, target=0.5, recalibrate_batches=2), progress=False)
    assert again.nothing_to_do and snapshot(store) == before
    with pytest.raises(Exception, match="other settings.*recalibrate_batches"):
        run_imp(store, "src", "os", ImpSettings(one_shot=True, target=0.5), progress=False)
    assert snapshot(store) == before


def test_without_recalibration_the_round_is_the_masked_source(store):
    run_imp(store, "src", "raw", ImpSettings(one_shot=True, target=0.8, recalibrate_batches=0), progress=False)
    source, ckpt = load_checkpoint("src", store), load_checkpoint("raw@round-1", store)
    assert ckpt.state_dict.keys() == source.state_dict.keys()
    assert all(torch.equal(v, source.state_dict[k] * ckpt.masks[k] if k in ckpt.masks else source.state_dict[k])
               for k, v in ckpt.state_dict.items())
    assert store.resolve("raw@round-1").meta["sparsity"]["prunable"] == pytest.approx(0.8, abs=1e-4)


def test_fine_tuning_keeps_the_masks_and_pruned_weights_zero(store):
    run_imp(store, "src", "ft", ImpSettings(one_shot=True, target=0.5, finetune_epochs=1), progress=False)
    run_imp(store, "src", "os", ImpSettings(one_shot=True, target=0.5), progress=False)
    tuned, plain = load_checkpoint("ft@round-1", store), load_checkpoint("os@round-1", store)
    assert M.mask_checksum(tuned.masks) == M.mask_checksum(plain.masks)
    for key, mask in tuned.masks.items():
        assert (tuned.state_dict[key][~mask] == 0).all()
    assert any(not torch.equal(tuned.state_dict[k], plain.state_dict[k]) for k in tuned.masks)  # it trained
    meta = store.resolve("ft@round-1").meta
    assert meta["train"]["epochs"] == 1 and meta["imp"]["settings"]["finetune_epochs"] == 1
    assert not [a for a in store.list("ft") if "epoch" in a.tag]
    assert all(b.momentum == 0.1 for b in batchnorms(build_model(tuned)))


def test_cli_one_shot_is_one_round_and_reads_back(store):
    args = ["--store", str(store.root), "imp", "src", "--name", "os", "--one-shot", "--target", "0.5",
            "--no-progress", "--format", "json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [row["round"] for row in doc["rows"]] == [0, 1] and doc["final"] == "os@round-1"
    assert doc["settings"]["one_shot"] is True and doc["rows"][1]["sparsity_prunable"] == pytest.approx(0.5, abs=1e-4)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout)["nothing_to_do"] is True
    shown = CliRunner().invoke(app, ["--store", str(store.root), "evaluate", "os@round-1", "--format", "json"])
    assert shown.exit_code == 0, shown.output


def test_channel_granularity_and_the_random_prune_control_work_one_shot(store):
    settings = ImpSettings(one_shot=True, target=0.5, granularity="channel", structures=("mlp",))
    report = run_imp(store, "src", "st", settings, control="random-prune", progress=False)
    assert [(r.round, r.kind) for r in report.rows] == [(0, "ticket"), (1, "ticket"), (1, "random-prune")]
    ticket, control = store.resolve("st@round-1").meta["imp"], store.resolve("st@random-prune-round-1").meta["imp"]
    assert ticket["structures_pruned"] == ticket["structures_eligible"] // 2 == control["structures_pruned"]
    assert ticket["mask_sha256"] != control["mask_sha256"]
    assert control["rewind"] == "st@round-0"  # the random structures go from the source's own weights too
