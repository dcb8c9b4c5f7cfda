"""Training into the store and evaluating any reference: the library behind `spkprune train` and `spkprune evaluate`
(and any recipe stage that trains).

Artifacts of a run NAME:
- `NAME@init`: the initial weights (lottery-ticket rewinding goes back to them), written before the first step.
- `NAME@epoch-K`: the weights after epoch K. Kept: the epochs in `keep_epochs` (late-rewinding points) and the
  last finished one; the others are deleted as the run moves on, so the store stays small.
- `NAME@iter-K`: the weights after optimiser step K, for each K in `save_iters` (iteration rewinding).
- `NAME@train-state` (kind `train-state`, `spkprune.training.state`): weights, masks, optimiser, schedule, AMP scaler
  and RNG state after the last finished epoch, replaced every epoch; `resume=True` continues from it. Deleted when
  the run finishes.
- `NAME` (`NAME@main`): the final weights with `meta["metrics"]` (test top1/top5/loss), `meta["train"]` (the full
  TrainConfig), `meta["config"]`, `meta["arch"]`, `meta["seed"]`.
Each epoch writes the new checkpoint first, then the training state, then deletes stale epochs: a process killed
at any point leaves a resumable run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spkprune.checkpoint import Checkpoint, build_model, load_checkpoint, save_checkpoint
from spkprune.data import get_dataset
from spkprune.errors import SpkpruneError
from spkprune.models import create_model
from spkprune.models.selector import selector_config, tokens_per_block
from spkprune.store import Artifact, Store, check_name
from spkprune.training import distributed
from spkprune.training.config import TrainConfig
from spkprune.training.datasets import check_compatible, train_test_splits
from spkprune.training.evaluate import evaluate
from spkprune.training.loop import FitResult, TrainHooks, TrainState, fit
from spkprune.training.state import load_train_state, save_train_state, seed_everything, weights_of

DEFAULT_KEEP_EPOCHS = (1, 2, 3)
STATE_TAG = "train-state"


@dataclass
class TrainOutcome:
    artifact: Artifact | None  # NAME@main (None on processes other than rank 0)
    metrics: dict
    result: FitResult | None  # None when the run had already finished
    resumed_from_epoch: int | None


def epoch_tag(epoch: int) -> str:
    return f"epoch-{epoch}"


def iter_tag(step: int) -> str:
    return f"iter-{step}"


class _RunWriter:
    """The on_epoch_end / on_step_end hooks that save the run's artifacts (rank 0 only)."""

    def __init__(self, store: Store, name: str, base_meta: dict, masks: dict, keep_epochs, save_iters):
        self.store, self.name, self.base_meta, self.masks = store, name, base_meta, masks
        self.keep_epochs = set(keep_epochs)
        self.save_iters = set(save_iters)
        self.parent = f"{name}@init"
        self.main = distributed.is_main()

    def _save(self, tag: str, weights: dict[str, torch.Tensor], extra: dict) -> Artifact:
        ckpt = Checkpoint(weights, self.masks, {**self.base_meta, **extra})
        return save_checkpoint(self.store, self.name, tag, ckpt, parent=self.parent, replace=True)

    def on_step_end(self, state: TrainState) -> None:
        if self.main and state.global_step in self.save_iters:
            extra = {"epoch": state.epoch, "step": state.global_step}
            self._save(iter_tag(state.global_step), weights_of(state.model), extra)

    def on_epoch_end(self, state: TrainState) -> None:
        if not self.main:
            return
        weights = weights_of(state.model)
        metrics = {k: state.metrics[k] for k in ("top1", "top5", "loss") if k in state.metrics}
        self._save(
            epoch_tag(state.epoch), weights,
            {"epoch": state.epoch, "step": state.global_step, "metrics": metrics, "history": state.history},
        )
        save_train_state(
            self.store, self.name, STATE_TAG, weights=weights, masks=self.masks, resume=state.state_tensors(),
            meta={"epoch": state.epoch}, parent=self.parent,
        )
        self.drop_stale_epochs(state.epoch)

    def drop_stale_epochs(self, last_epoch: int) -> None:
        for tag in self.store.tags(self.name):
            if tag.startswith("epoch-") and tag[6:].isdigit():
                epoch = int(tag[6:])
                if epoch != last_epoch and epoch not in self.keep_epochs:
                    self.store.delete(self.name, tag)


def _initial_model(store, arch, init, overrides) -> tuple[nn.Module, dict, str | None]:
    """(model, masks, parent) for a fresh run: preset `arch`, or the weights (and masks) of checkpoint `init`."""
    if init is None:
        if arch is None:
            raise SpkpruneError("give --arch PRESET (or --init REF to start from a checkpoint)")
        return create_model(arch, **overrides), {}, None
    ckpt = load_checkpoint(init, store)
    if arch is not None and ckpt.arch not in (None, arch):
        raise SpkpruneError(f"--init {init} is a {ckpt.arch} checkpoint, not {arch}; drop --arch or change it")
    model = build_model(ckpt, arch=arch)
    if overrides:  # e.g. fewer time steps: the same weights, masks, token selectors and widths per block
        config = {**model.config.to_dict(), **overrides}
        model = build_model(dataclasses.replace(ckpt, meta={**ckpt.meta, "arch": ckpt.arch or arch, "config": config}))
    return model, dict(ckpt.masks), ckpt.ref


def _refuse_existing(store: Store, name: str) -> None:
    tags = store.tags(name)
    if tags:
        raise SpkpruneError(
            f"{name} already exists in the store (tags: {', '.join(sorted(tags))}); pass --resume to continue it "
            f"or choose another --name"
        )


def train_to_store(
    store: Store,
    name: str,
    cfg: TrainConfig,
    *,
    arch: str | None = None,
    init: str | None = None,
    model_overrides: dict | None = None,
    keep_epochs=DEFAULT_KEEP_EPOCHS,
    save_iters=(),
    progress: bool = True,
) -> TrainOutcome:
    """Train a new run NAME from preset `arch` (or from checkpoint `init`) and save its artifacts (see above)."""
    check_name(name)
    cfg.validate()
    overrides = dict(model_overrides or {})
    if cfg.timesteps is not None:
        overrides["timesteps"] = cfg.timesteps
    _refuse_existing(store, name)
    distributed.barrier()  # every process has checked before rank 0 writes anything
    seed_everything(cfg.seed)
    model, masks, parent = _initial_model(store, arch, init, overrides)
    check_compatible(model, cfg.dataset)
    data = train_test_splits(cfg, model)  # a missing data set fails here, before anything is written
    meta = {
        "arch": model.preset or arch,
        "config": model.config.to_dict(),
        "selector": selector_config(model),
        "seed": cfg.seed,
        "train": cfg.to_dict(),
        "run": {"keep_epochs": sorted(set(keep_epochs)), "save_iters": sorted(set(save_iters)), "init": init},
    }
    if distributed.is_main():
        save_checkpoint(store, name, "init", Checkpoint(weights_of(model), masks, {**meta, "epoch": 0}), parent=parent)
    distributed.barrier()
    return _run(store, name, model, cfg, masks, meta, None, progress, data)


def resume_in_store(store: Store, name: str, *, overrides: dict | None = None, progress: bool = True) -> TrainOutcome:
    """Continue run NAME from its last finished epoch (or from its initial weights if none finished)."""
    check_name(name)
    overrides = dict(overrides or {})
    speed = {key: overrides.pop(key) for key in SPEED_OPTIONS if key in overrides}
    if store.exists(name, "main"):
        art = store.resolve(name)
        if art.meta.get("train"):
            _check_same(TrainConfig(**art.meta["train"]), overrides, name)
        if distributed.is_main() and store.exists(name, STATE_TAG):
            store.delete(name, STATE_TAG)  # the run was killed after saving NAME@main, before removing its state
        return TrainOutcome(art, art.meta.get("metrics", {}), None, None)
    if not store.exists(name, "init"):
        raise SpkpruneError(f"nothing to resume: {name}@init is not in the store; start the run without --resume")
    init = load_checkpoint(f"{name}@init", store)
    meta = {k: v for k, v in init.meta.items() if k not in ("epoch", "created", "parent", "sparsity")}
    cfg = TrainConfig.from_dict(meta["train"])
    _check_same(cfg, overrides, name)
    cfg = cfg.replace(**speed)
    if store.exists(name, STATE_TAG):
        saved = load_train_state(store, store.resolve(f"{name}@{STATE_TAG}"))
        ckpt = dataclasses.replace(init, state_dict=saved.weights)
        resume, start = saved.resume, saved.epoch
    else:
        ckpt, resume, start = init, None, 0
    model = build_model(ckpt)
    outcome = _run(store, name, model, cfg, dict(init.masks), meta, resume, progress, train_test_splits(cfg, model))
    outcome.resumed_from_epoch = start
    return outcome


# Options that change how fast a run goes, never what it computes: a resumed run may change them.
SPEED_OPTIONS = ("compile", "num_workers")


def _check_same(cfg: TrainConfig, overrides: dict, name: str) -> None:
    stored = cfg.to_dict()
    differ = [f"{k} {v!r} (run has {stored.get(k)!r})" for k, v in overrides.items() if stored.get(k) != v]
    if differ:
        raise SpkpruneError(
            f"--resume continues {name} with its own settings; these options differ: {', '.join(differ)}; "
            f"drop them or start a new --name"
        )


def _run(store, name, model, cfg, masks, meta, resume, progress, data) -> TrainOutcome:
    run = meta.get("run", {})
    writer = _RunWriter(store, name, meta, masks, run.get("keep_epochs", DEFAULT_KEEP_EPOCHS), run.get("save_iters", ()))
    hooks = TrainHooks(on_step_end=writer.on_step_end if writer.save_iters else None, on_epoch_end=writer.on_epoch_end)
    result = fit(
        model, cfg, masks=masks or None, hooks=hooks, resume=resume, progress=progress,
        train_data=data[0], test_data=data[1],
    )
    metrics = {k: result.metrics[k] for k in ("top1", "top5", "loss", "samples")}
    metrics.update(dataset=cfg.dataset, split="test")
    artifact = None
    if distributed.is_main():
        final = {**meta, "epoch": result.epochs, "step": result.global_step, "metrics": metrics,
                 "history": result.history}
        ckpt = Checkpoint(weights_of(model), masks, final)
        artifact = save_checkpoint(store, name, "main", ckpt, parent=f"{name}@init")
        if store.exists(name, STATE_TAG):
            store.delete(name, STATE_TAG)
        writer.drop_stale_epochs(result.epochs)
    distributed.barrier()
    return TrainOutcome(artifact, metrics, result, None)


def evaluate_checkpoint(
    ref: str,
    store_path=None,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    compile: bool = False,
) -> dict:
    """Load `ref` (store reference, file, folder or hf://), evaluate it on the test split of its data set.

    Returns `evaluate()`'s metrics plus `ref`, `dataset`, `timesteps` (the model's T) and `tokens_per_block` (None
    for a model without token selectors).
    """
    store = None
    if store_path is not None and Path(store_path).is_dir():
        store = Store.open(store_path, create=False)
    ckpt = load_checkpoint(ref, store)
    train_meta = ckpt.meta.get("train") or {}
    dataset = dataset or train_meta.get("dataset") or (ckpt.meta.get("config") or {}).get("dataset")
    if not dataset:
        raise SpkpruneError(f"{ckpt.ref or ref} does not say which data set it was trained on; pass --dataset")
    if data_dir is None and dataset == train_meta.get("dataset"):
        data_dir = train_meta.get("data_dir")
    model = build_model(ckpt)
    check_compatible(model, dataset)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = get_dataset(dataset, "test", data_dir, timesteps=model.config.timesteps, img_size=model.config.img_size)
    metrics = evaluate(model.to(device), data, batch_size, record_firing=True, device=device, compile=compile)
    tokens = tokens_per_block(model) if len(getattr(model, "token_selectors", {})) > 0 else None
    return {"ref": ckpt.ref or ref, "dataset": dataset, "timesteps": model.config.timesteps, **metrics,
            "tokens_per_block": tokens}
