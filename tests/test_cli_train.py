"""`spkprune train` and `spkprune evaluate` through the CLI: artifacts, metadata, resume, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from spkprune.checkpoint import load_checkpoint
from spkprune.cli import app
from spkprune.store import Store
from spkprune.training import runner as runner_module

torch.set_num_threads(1)
PRESET = "spikformer-2-64-digits"
SMALL = ["--arch", PRESET, "--epochs", "2", "--batch-size", "16", "--limit-batches", "2", "--no-progress"]


def _cli(store, *args):
    return CliRunner().invoke(app, ["--store", str(store), *args])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    result = _cli(store, "train", *SMALL, "--name", "d", "--seed", "5", "--format", "json")
    assert result.exit_code == 0, result.output
    return store, json.loads(result.stdout)


def test_train_saves_init_epochs_and_main_with_metrics(trained):
    root, doc = trained
    store = Store.open(root, create=False)
    assert sorted(store.tags("d")) == ["epoch-1", "epoch-2", "init", "main"]  # train-state removed at the end
    row = doc["rows"][0]
    assert row["name"] == "d@main" and row["dataset"] == "digits" and row["epochs"] == 2
    main = load_checkpoint("d", store)
    assert main.meta["arch"] == PRESET and main.meta["seed"] == 5
    assert main.meta["config"]["timesteps"] == 4 and main.meta["config"]["embed_dim"] == 64
    train = main.meta["train"]
    assert train["dataset"] == "digits" and train["epochs"] == 2 and train["batch_size"] == 16 and train["seed"] == 5
    assert main.meta["metrics"]["top1"] == pytest.approx(row["top1"]) and main.meta["metrics"]["samples"] == 360
    assert 0.0 <= row["top1"] <= row["top5"] <= 1.0
    assert [h["epoch"] for h in main.meta["history"]] == [1, 2]
    init, epoch2 = load_checkpoint("d@init", store), load_checkpoint("d@epoch-2", store)
    assert init.meta["epoch"] == 0 and store.resolve("d@epoch-1").parent == "d@init"
    key = "block.0.attn.q_linear.weight"
    assert not torch.equal(init.state_dict[key], main.state_dict[key])  # training moved the weights
    assert all(torch.equal(v, epoch2.state_dict[k]) for k, v in main.state_dict.items())


def test_evaluate_reproduces_the_stored_metrics(trained):
    root, _ = trained
    result = _cli(root, "evaluate", "d", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    main = load_checkpoint("d", Store.open(root, create=False))
    assert doc["top1"] == pytest.approx(main.meta["metrics"]["top1"], abs=1e-12) and doc["loss"] == pytest.approx(main.meta["metrics"]["loss"])
    assert doc["dataset"] == "digits" and doc["samples"] == 360 and doc["tokens_per_block"] is None
    from spkprune.models import create_model

    assert [r["site"] for r in doc["rows"]] == list(create_model(PRESET).neuron_sites())
    csv = _cli(root, "evaluate", "d@epoch-1", "--format", "csv")
    assert csv.exit_code == 0 and csv.stdout.splitlines()[0] == "site,firing_rate"


def test_existing_name_is_refused_without_resume(trained):
    root, _ = trained
    before = sorted(a.ref for a in Store.open(root).list())
    line = _one_error_line(_cli(root, "train", *SMALL, "--name", "d"))
    assert "d already exists" in line and "--resume" in line
    assert sorted(a.ref for a in Store.open(root).list()) == before
    finished = _cli(root, "train", "--name", "d", "--resume", "--no-progress")
    assert finished.exit_code == 0 and "already finished" in finished.stderr
    same_arch = _cli(root, "train", "--name", "d", "--resume", "--arch", "spikformer-2-64-digits", "--no-progress")
    assert same_arch.exit_code == 0 and "already finished" in same_arch.stderr, same_arch.stderr
    other_arch = _one_error_line(_cli(root, "train", "--name", "d", "--resume", "--arch", "spikformer-4-64-digits"))
    assert "these differ: --arch spikformer-4-64-digits (the run has spikformer-2-64-digits)" in other_arch
    changed = _one_error_line(_cli(root, "train", "--name", "d", "--resume", "--lr", "0.5", "--no-progress"))
    assert "--resume continues d with its own settings" in changed and "lr 0.5" in changed
    assert sorted(a.ref for a in Store.open(root).list()) == before


def test_bad_input_exits_2_and_leaves_the_store_unchanged(tmp_path):
    line = _one_error_line(_cli(tmp_path, "train", "--arch", "spikformer-9-999-nope", "--name", "x", "--no-progress"))
    assert "unknown preset 'spikformer-9-999-nope'" in line
    line = _one_error_line(_cli(tmp_path, "train", "--dataset", "cifar10", "--name", "x", "--epochs", "1"))
    assert "cifar10 needs --data-dir" in line
    line = _one_error_line(_cli(tmp_path, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"),
                                "--arch", "spikformer-2-384-cifar10", "--name", "x", "--epochs", "1"))
    assert "cifar-10-batches-py" in line
    line = _one_error_line(_cli(tmp_path, "train", "--arch", "spikformer-2-384-cifar10", "--name", "x"))
    assert "does not fit dataset digits" in line
    line = _one_error_line(_cli(tmp_path, "train", "--name", "x", "--resume"))
    assert "nothing to resume" in line
    line = _one_error_line(_cli(tmp_path, "evaluate", "missing"))
    assert "missing" in line
    assert Store.open(tmp_path).list() == []


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = [*SMALL, "--seed", "1"]
    assert _cli(tmp_path, "train", *args, "--name", "straight").exit_code == 0

    original = runner_module._RunWriter.on_epoch_end

    def killed_after_first_epoch(self, state):
        original(self, state)
        raise KeyboardInterrupt  # the process dies right after epoch 1 is safely stored

    monkeypatch.setattr(runner_module._RunWriter, "on_epoch_end", killed_after_first_epoch)
    interrupted = _cli(tmp_path, "train", *args, "--name", "killed")
    assert interrupted.exit_code == 130
    store = Store.open(tmp_path)
    assert sorted(store.tags("killed")) == ["epoch-1", "init", "train-state"]
    monkeypatch.setattr(runner_module._RunWriter, "on_epoch_end", original)

    differing = _one_error_line(_cli(tmp_path, "train", "--name", "killed", "--resume", "--lr", "0.1"))
    assert "lr 0.1" in differing
    resumed = _cli(tmp_path, "train", "--name", "killed", "--resume", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed killed after epoch 1" in resumed.stderr
    a, b = load_checkpoint("straight", store), load_checkpoint("killed", store)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(v, b.state_dict[k]) for k, v in a.state_dict.items())
    assert a.meta["metrics"] == b.meta["metrics"]
    assert sorted(store.tags("killed")) == ["epoch-1", "epoch-2", "init", "main"]


def test_keep_epochs_and_save_iter(tmp_path):
    result = _cli(tmp_path, "train", "--arch", PRESET, "--epochs", "3", "--batch-size", "16", "--limit-batches", "1",
                  "--keep-epochs", "2", "--save-iter", "1", "--name", "k", "--no-progress")
    assert result.exit_code == 0, result.output
    store = Store.open(tmp_path)
    assert sorted(store.tags("k")) == ["epoch-2", "epoch-3", "init", "iter-1", "main"]
    iter1, epoch1_equiv = load_checkpoint("k@iter-1", store), load_checkpoint("k@epoch-2", store)
    assert iter1.meta["step"] == 1 and epoch1_equiv.meta["step"] == 2


def test_init_from_a_checkpoint_keeps_its_weights_and_masks(trained, tmp_path):
    from spkprune.checkpoint import Checkpoint, save_checkpoint

    root, _ = trained
    store = Store.open(root)
    source = load_checkpoint("d", store)
    key = "block.1.mlp.fc2_linear.weight"
    mask = torch.rand(source.state_dict[key].shape, generator=torch.Generator().manual_seed(0)) > 0.5
    pruned = dict(source.state_dict, **{key: source.state_dict[key] * mask})
    save_checkpoint(store, "ticket", "main", Checkpoint(pruned, {key: mask}, source.meta), replace=True)
    result = _cli(root, "train", "--init", "ticket", "--epochs", "1", "--batch-size", "16", "--limit-batches", "1",
                  "--name", "from-ticket", "--no-progress")
    assert result.exit_code == 0, result.output
    init, final = load_checkpoint("from-ticket@init", store), load_checkpoint("from-ticket", store)
    assert all(torch.equal(v, init.state_dict[k]) for k, v in pruned.items())
    assert init.meta["arch"] == PRESET and torch.equal(final.masks[key], mask)
    assert torch.count_nonzero(final.state_dict[key][~mask]) == 0
    assert not torch.equal(final.state_dict[key], pruned[key])
    assert store.resolve("from-ticket@init").parent == "ticket@main"


@pytest.mark.slow  # torch.compile of the training kernels: ~85 s with a cold inductor cache, ~7 s warm
def test_compile_runs_the_fused_training_kernels_through_torch_compile(tmp_path, monkeypatch):
    from spkprune.models import lif_kernels

    calls = []
    real = lif_kernels.compiled_kernel
    monkeypatch.setattr(lif_kernels, "compiled_kernel", lambda name: calls.append(name) or real(name))
    result = _cli(tmp_path, "train", "--arch", PRESET, "--epochs", "1", "--batch-size", "16", "--limit-batches", "1",
                  "--compile", "--name", "c", "--no-progress")
    assert result.exit_code == 0, result.output
    assert load_checkpoint("c", Store.open(tmp_path)).meta["train"]["compile"] is True
    # every fused site forward and backward, and the attention neurons' forward and backward
    assert set(calls) == {"charge_from_input", "backward_from_input", "charge", "backward"}
    assert calls.count("charge_from_input") == calls.count("backward_from_input") > 0
    assert calls.count("charge") == calls.count("backward") > 0


@pytest.mark.slow
def test_digits_defaults_reach_95_percent(tmp_path):
    """The README demo's claim: the default recipe trains spikformer-2-64-digits to >= 95% test accuracy."""
    result = _cli(tmp_path, "train", "--name", "digits", "--threads", "1", "--no-progress", "--format", "json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["rows"][0]
    assert row["arch"] == PRESET and row["epochs"] == 5
    assert row["top1"] >= 0.95
