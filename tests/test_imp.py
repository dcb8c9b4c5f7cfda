"""`spkprune imp`: rounds, exact sparsity, lineage, rewinding, controls, early-time tickets, resume, bad input.

The source is a tiny digits Spikformer (32 channels, T=2, one epoch at batch 256) so that a round takes seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.models import create_model
from spkprune.pruning import imp as imp_mod
from spkprune.pruning import lottery as lottery_mod
from spkprune.pruning import masks as M
from spkprune.pruning import rewind as rewind_mod
from spkprune.pruning.imp import ImpSettings, run_imp
from spkprune.store import Store
from spkprune.training import TrainConfig, TrainHooks, fit
from storekit import TRAIN, copied_store, snapshot, trained_source

REPO = Path(__file__).resolve().parents[1]
TINY = dict(timesteps=2, embed_dim=32, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_meta(model) -> dict:
    return {"arch": model.preset, "config": model.config.to_dict(), "selector": None}


@pytest.fixture(scope="module")
def source_store(tmp_path_factory) -> Path:
    """`src@init`, `src@epoch-1` and `src` (trained one epoch, with its training configuration)."""
    return trained_source(tmp_path_factory.mktemp("imp") / "store", TINY, tags=("epoch-1", "main"))


@pytest.fixture
def store(source_store, tmp_path) -> Store:
    return copied_store(source_store, tmp_path)


# ----------------------------------------------------------------------------------------------- library
def test_rounds_reach_the_target_exactly_with_lineage_and_are_skipped_on_rerun(store):
    settings = ImpSettings(rounds=2, target=0.75, epochs_per_round=1)
    report = run_imp(store, "src", "t", settings, progress=False)
    assert [(r.round, r.kind) for r in report.rows] == [(0, "ticket"), (1, "ticket"), (2, "ticket")]
    source = load_checkpoint("src", store)
    prunable = list(create_model("spikformer-2-64-digits", **TINY).prunable_weights())
    total = sum(source.state_dict[k].numel() for k in prunable)

    zero = load_checkpoint("t@round-0", store)
    assert zero.masks == {}
    assert all(torch.equal(zero.state_dict[k], v) for k, v in source.state_dict.items())
    previous = M.full_masks(source.state_dict, prunable)
    for k, level in enumerate(M.sparsity_schedule(2, target=0.75), start=1):
        ckpt = load_checkpoint(f"t@round-{k}", store)
        assert set(ckpt.masks) == set(prunable)
        assert M.count_pruned(ckpt.masks) == int(total * level + 0.5)
        assert all(not (ckpt.masks[key] & ~previous[key]).any() for key in prunable)  # masks only shrink
        for key, mask in ckpt.masks.items():
            assert (ckpt.state_dict[key][~mask] == 0).all()
        art = store.resolve(f"t@round-{k}")
        assert art.parent == f"t@round-{k - 1}"
        assert art.meta["imp"]["mask_sha256"] == M.mask_checksum(ckpt.masks)
        assert art.meta["sparsity"]["prunable"] == pytest.approx(M.count_pruned(ckpt.masks) / total)
        previous = ckpt.masks
    assert report.rows[-1].sparsity_prunable == pytest.approx(0.75, abs=1 / total)
    assert store.resolve("t@round-0").parent == "src@main"
    assert not [a for a in store.list("t") if "epoch" in a.tag]  # resume states are cleaned up
    assert report.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = snapshot(store)
    again = run_imp(store, "src", "t", settings, progress=False)
    assert again.nothing_to_do and snapshot(store) == before
    assert [r.top1 for r in again.rows] == [r.top1 for r in report.rows]


def test_round_one_rewinds_survivors_to_init(store, monkeypatch):
    """The weights that round 1 starts from are the initial weights with round 1's mask applied."""
    seen = {}
    real_fit = imp_mod.fit

    def spy(model, cfg, **kwargs):
        seen["start"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["offset"] = kwargs["schedule_offset_iters"]
        return real_fit(model, cfg, **kwargs)

    monkeypatch.setattr(imp_mod, "fit", spy)
    run_imp(store, "src", "t", ImpSettings(rounds=1, target=0.5, epochs_per_round=1), progress=False)
    init = load_checkpoint("src@init", store).state_dict
    masks = load_checkpoint("t@round-1", store).masks
    for key, value in init.items():
        assert torch.equal(seen["start"][key], value), key  # fit itself applies the mask
    assert seen["offset"] == 0
    trained = load_checkpoint("src", store).state_dict
    scores = {k: trained[k].abs() for k in masks}
    kept_min = min(float(s[masks[k]].min()) for k, s in scores.items())
    pruned_max = max(float(s[~masks[k]].max()) for k, s in scores.items())
    assert pruned_max <= kept_min  # the mask is the trained weights' magnitude ranking, not the init's


def test_late_rewinding_fast_forwards_the_schedule(store, monkeypatch):
    offsets = []
    real_fit = imp_mod.fit

    def spy(model, cfg, **kwargs):
        offsets.append(kwargs["schedule_offset_iters"])
        return real_fit(model, cfg, **kwargs)

    monkeypatch.setattr(imp_mod, "fit", spy)
    run_imp(store, "src", "t", ImpSettings(rounds=1, target=0.5, epochs_per_round=1, rewind="epoch:1"), progress=False)
    assert offsets == [1437 // 256]  # one epoch of the dense run: 1437 training digits, batch 256, last dropped
    assert store.resolve("t@round-1").meta["imp"]["rewind"] == "src@epoch-1"


def test_pruned_weights_stay_zero_through_adamw_steps(store):
    """Momentum must not regrow a weight: after every real AdamW step the pruned weights and their moments are 0."""
    ckpt = load_checkpoint("src", store)
    model = create_model("spikformer-2-64-digits", **TINY)
    model.load_state_dict(ckpt.state_dict)
    prunable = list(model.prunable_weights())
    masks = M.magnitude_masks(ckpt.state_dict, M.full_masks(ckpt.state_dict, prunable), 0.8, "global")
    params = dict(model.named_parameters())
    steps = []

    def check(state):
        for key, mask in masks.items():
            assert (params[key].detach()[~mask] == 0).all()
            moments = state.optimizer.state[params[key]]
            assert (moments["exp_avg"][~mask] == 0).all() and (moments["exp_avg_sq"][~mask] == 0).all()
        steps.append(state.global_step)

    cfg = TrainConfig(**{**TRAIN.to_dict(), "weight_decay": 0.5, "lr": 0.05})
    fit(model, cfg, masks=masks, hooks=TrainHooks(on_step_end=check), progress=False)
    assert steps == list(range(1, 1437 // 256 + 1))
    moved = sum(int((params[k].detach() != ckpt.state_dict[k]).logical_and(m).sum()) for k, m in masks.items())
    assert moved > 0.9 * sum(int(m.sum()) for m in masks.values())  # the kept weights did train
    with pytest.raises(RuntimeError, match="pruned weights of"):
        regrown = {k: v.detach().clone() + 1 for k, v in model.state_dict().items()}
        lottery_mod._check_pruned_zero(regrown, masks, "t@round-1")


def test_controls_share_the_ticket_sparsity_but_not_its_mask_or_init(store):
    settings = ImpSettings(rounds=1, target=0.6, epochs_per_round=1)
    run_imp(store, "src", "t", settings, control="random-reinit", progress=False)
    report = run_imp(store, "src", "t", settings, control="random-prune", progress=False)
    assert [r.kind for r in report.rows] == ["ticket", "ticket", "random-reinit", "random-prune"]
    ticket = load_checkpoint("t@round-1", store)
    reinit = load_checkpoint("t@random-reinit-round-1", store)
    rprune = load_checkpoint("t@random-prune-round-1", store)
    assert M.mask_checksum(reinit.masks) == M.mask_checksum(ticket.masks)
    assert M.mask_checksum(rprune.masks) != M.mask_checksum(ticket.masks)
    assert M.layer_sparsity(rprune.masks) == M.layer_sparsity(ticket.masks)
    assert store.resolve("t@random-reinit-round-1").parent == "t@round-1"
    rows = {r.kind: r for r in report.rows if r.round == 1}
    assert rows["random-prune"].sparsity_prunable == rows["ticket"].sparsity_prunable


def test_fresh_initialisation_is_seeded_and_differs_from_init(store):
    src = rewind_mod.load_source(store, "src", ImpSettings(rounds=1))
    run = lottery_mod.Lottery(store, src, "t", ImpSettings(rounds=1), progress=False, log=print)
    a, b = run.fresh_model(2, seed=11).state_dict(), run.fresh_model(2, seed=11).state_dict()
    init = load_checkpoint("src@init", store).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], init["head.weight"])


def test_layerwise_scope_with_exclusions(store):
    settings = ImpSettings(rounds=1, target=0.5, scope="layerwise", exclude=("head.weight", "patch_embed.proj_conv.*"),
                           epochs_per_round=1)
    run_imp(store, "src", "t", settings, progress=False)
    ckpt = load_checkpoint("t@round-1", store)
    assert "head.weight" not in ckpt.masks and "patch_embed.proj_conv.weight" not in ckpt.masks
    for key, mask in ckpt.masks.items():
        assert int((~mask).sum()) == int(mask.numel() * 0.5 + 0.5), key


def test_early_time_ticket_searches_at_fewer_timesteps(store):
    report = run_imp(store, "src", "t", ImpSettings(rounds=2, target=0.5, epochs_per_round=1, search_timesteps=1),
                     progress=False)
    assert [r.timesteps for r in report.rows] == [2, 1, 2]
    assert store.resolve("t@round-1").meta["config"]["timesteps"] == 2  # artifacts stay full-T checkpoints


def test_other_settings_under_the_same_name_are_refused(store):
    run_imp(store, "src", "t", ImpSettings(rounds=1, target=0.5, epochs_per_round=1), progress=False)
    before = snapshot(store)
    with pytest.raises(Exception, match="other settings.*target"):
        run_imp(store, "src", "t", ImpSettings(rounds=1, target=0.6, epochs_per_round=1), progress=False)
    assert snapshot(store) == before


# ------------------------------------------------------------------------------------------- bad input
def _no_train_config(store: Store) -> None:
    model = create_model("spikformer-2-64-digits", **TINY)
    save_checkpoint(store, "imported", "main", Checkpoint(model.state_dict(), {}, _tiny_meta(model)))


@pytest.mark.parametrize(
    "args,message",
    [
        (["src", "--target", "1.5"], "--target: must be < 1 "),
        (["src", "--target", "0"], "--target: must be > 0 "),
        (["src", "--rounds", "0"], "--rounds: must be >= 1 "),
        (["src", "--rewind", "epoch:7"], "trained for only 1 epochs"),
        (["src", "--rewind", "iter:3"], "rewind point src@iter-3"),
        (["src", "--rewind", "later"], "--rewind: must be init, epoch:K or iter:K"),
        (["src", "--exclude", "head.weight", "--exclude", "nope*"], "'nope\\*' match no prunable weight"),
        (["imported"], "has no training configuration"),
        (["nosuch"], "no artifact named 'nosuch'"),
        (["src", "--control", "shuffle"], "'shuffle' is not one of 'none', 'random-reinit', 'random-prune'"),
        (["src", "--resume"], "nothing to resume"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_the_store_is_unchanged(store, args, message):
    _no_train_config(store)
    before = snapshot(store)
    result = CliRunner().invoke(app, ["--store", str(store.root), "imp", *args, "--name", "t", "--epochs-per-round", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert pytest.importorskip("re").search(message, lines[0]), lines[0]
    assert snapshot(store) == before
    assert not (store.root / "plots").exists()


def test_cli_json_is_one_document_with_the_rounds(store):
    result = CliRunner().invoke(
        app, ["--store", str(store.root), "imp", "src", "--name", "t", "--rounds", "1", "--target", "0.5",
              "--epochs-per-round", "1", "--no-progress", "--format", "json"],
    )
    assert result.exit_code == 0, result.output
    import json

    doc = json.loads(result.stdout)
    assert [row["round"] for row in doc["rows"]] == [0, 1]
    assert doc["final"] == "t@round-1" and doc["rows"][1]["sparsity_prunable"] == pytest.approx(0.5, abs=1e-4)
    assert Path(doc["plot"]).is_file()


# ----------------------------------------------------------------------------------------------- resume
def _imp_process(store_root: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "spkprune", "--store", str(store_root), "imp", "src", "--name", "t", "--rounds", "2",
           "--target", "0.75", "--epochs-per-round", "2", "--no-progress", "--format", "json", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_mid_round_resumes_to_the_same_weights(source_store, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    shutil.copytree(source_store, killed)
    shutil.copytree(source_store, clean)
    reference = _imp_process(clean)

    victim = _imp_process(killed)
    store = Store.open(killed)
    deadline = time.time() + 300
    while not store.exists("t", "round-2-epoch-1"):
        assert victim.poll() is None and time.time() < deadline, "the run ended before round 2 epoch 1 was saved"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert store.exists("t", "round-1") and not store.exists("t", "round-2")

    resumed = _imp_process(killed)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "t@round-2: 75.00% of the eligible weights pruned, T=2, 2 epochs (resuming after epoch 1)" in " ".join(err.split())
    out_ref, err_ref = reference.communicate(timeout=300)
    assert reference.returncode == 0, err_ref
    for tag in ("round-1", "round-2"):
        a = load_checkpoint(f"t@{tag}", Store.open(killed))
        b = load_checkpoint(f"t@{tag}", Store.open(clean))
        assert M.mask_checksum(a.masks) == M.mask_checksum(b.masks)
        for key in b.state_dict:
            assert torch.equal(a.state_dict[key], b.state_dict[key]), (tag, key)
    assert not [a.tag for a in Store.open(killed).list("t") if "epoch" in a.tag]


@pytest.mark.slow
def test_torchrun_shares_one_mask_and_checks_its_checksum(source_store, tmp_path):
    """Two CPU processes (gloo): the mask is computed on rank 0, broadcast, checked by sha256 on both ranks."""
    root = tmp_path / "store"
    shutil.copytree(source_store, root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, "-m", "spkprune", "--store", str(root), "imp", "src", "--name", "d", "--rounds", "1",
           "--target", "0.5", "--epochs-per-round", "1", "--no-progress", "--format", "json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    doc = json.loads(done.stdout)  # rank 0 alone prints the document
    store = Store.open(root)
    trained = load_checkpoint("src", store).state_dict
    keys = list(create_model("spikformer-2-64-digits", **TINY).prunable_weights())
    expected = M.magnitude_masks(trained, M.full_masks(trained, keys), 0.5, "global")
    ticket = load_checkpoint("d@round-1", store)
    assert M.mask_checksum(ticket.masks) == M.mask_checksum(expected) == doc["final_mask_sha256"]
    assert [a.tag for a in store.list("d")] == ["round-0", "round-1"]


def test_a_checkpoint_with_a_token_selector_rewinds_through_its_parent_and_keeps_the_selector_dense(store):
    """A selector fine-tune has no @init of its own: imp rewinds the backbone to its parent's, and never prunes the
    selector's weights."""
    from spkprune.checkpoint import build_model
    from spkprune.models.selector import attach_selectors, selector_config

    source = load_checkpoint("src", store)
    model = attach_selectors(build_model(source), {"keep": 0.7, "scorer": "learned"})
    meta = {**source.meta, "selector": selector_config(model)}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(store, "sel", "main", Checkpoint(weights, {}, meta), parent="src@main")

    run_imp(store, "sel", "t", ImpSettings(rounds=1, target=0.5, epochs_per_round=1), progress=False)
    ticket = load_checkpoint("t@round-1", store)
    selector_keys = [k for k in ticket.state_dict if k.startswith("token_selectors.")]
    assert selector_keys and not any(k.startswith("token_selectors.") for k in ticket.masks)
    assert all(bool((ticket.state_dict[k] != 0).all()) for k in selector_keys if k.endswith("weight"))
    prunable = sum(m.numel() for m in ticket.masks.values())
    assert M.count_pruned(ticket.masks) == round(0.5 * prunable)
    assert build_model(ticket).token_selectors  # the ticket still carries its selector
