"""A tiny trained Spikformer in a store, the starting point of the IMP, structured and one-shot tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from spkprune.checkpoint import Checkpoint, save_checkpoint
from spkprune.models import create_model
from spkprune.store import Store
from spkprune.training import TrainConfig, fit

DIGITS = "spikformer-2-64-digits"
TRAIN = TrainConfig(epochs=1, batch_size=256, eval_batch_size=512, warmup_epochs=0, eval_every=0, lr=5e-3, seed=3)


def trained_source(root: Path, overrides: dict, tags: tuple[str, ...] = ("main",)) -> Path:
    """A store at `root` with `src@init` (seed 0) and `src` trained one epoch of `TRAIN` (with its training
    configuration in the metadata), saved under each of `tags`."""
    torch.set_num_threads(1)
    store = Store.open(root)
    torch.manual_seed(0)
    model = create_model(DIGITS, **overrides)
    meta = {"arch": model.preset, "config": model.config.to_dict(), "selector": None, "train": TRAIN.to_dict()}
    save_checkpoint(store, "src", "init", Checkpoint(_copy(model), {}, meta))
    fit(model, TRAIN, progress=False)
    weights = _copy(model)
    for tag in tags:
        save_checkpoint(store, "src", tag, Checkpoint(weights, {}, meta))
    return root


def copied_store(source: Path, tmp_path: Path) -> Store:
    """A private copy of the store at `source`, for one test to change."""
    shutil.copytree(source, tmp_path / "store")
    return Store.open(tmp_path / "store")


def snapshot(store: Store) -> list[tuple[str, str]]:
    """Every artifact's reference and checksum: equal before and after means the store is unchanged."""
    return [(a.ref, a.sha256) for a in store.list()]


def _copy(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}
