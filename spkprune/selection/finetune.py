"""`select_tokens`: attach token selectors to a checkpoint and fine-tune it with the selection loss.

The student starts from the checkpoint (a dense model or a lottery ticket: its masks are enforced by `fit`, so pruned
weights stay exactly zero; the selector's own weights are never pruned). The teacher is the same checkpoint without
selectors unless another one is given. Every scorer gets the same fine-tuning budget by default, so that the random
control of the paper's Table 3 is a fair comparison; `epochs=0` evaluates the training-free scorers as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from spkprune.checkpoint import Checkpoint, build_model
from spkprune.data import get_dataset
from spkprune.errors import SpkpruneError
from spkprune.models.selector import (
    attach_selectors,
    detach_selectors,
    selector_config,
    selectors_of,
    tokens_per_block,
    warm_start_from_firing_rate,
)
from spkprune.models.token_flow import dense_block_tokens
from spkprune.selection.loss import SelectionLoss
from spkprune.selection.settings import SelectionConfig
from spkprune.training import TrainConfig, TrainHooks, evaluate, fit
from spkprune.training.state import seed_everything

# Fine-tuning starts from a trained model: a shorter run at a lower peak learning rate than training from scratch.
FINETUNE_EPOCHS = 10
FINETUNE_LR_FACTOR = 0.2
FINETUNE_WARMUP_EPOCHS = 1
WARM_START_SAMPLES = 256  # training images that calibrate a firing-rate warm start


@dataclass
class SelectionResult:
    checkpoint: Checkpoint
    model: nn.Module
    metrics: dict  # the student's evaluate() metrics (top1, top5, loss, samples)
    teacher_metrics: dict | None
    tokens_per_block: list[int]
    history: list[dict] = field(default_factory=list)


def finetune_config(source: Checkpoint, epochs: int | None = None, **overrides):
    """The fine-tuning `TrainConfig`: the checkpoint's own training recipe (or the data set's default) with
    `epochs` (default 10), 1 warm-up epoch and a peak learning rate of 0.2 x the recipe's, then `overrides`."""
    train = source.meta.get("train")
    dataset = overrides.get("dataset") or (train or {}).get("dataset") or (source.meta.get("config") or {}).get("dataset")
    if not dataset:
        raise SpkpruneError(f"{source.ref or 'the checkpoint'} records no data set; pass --dataset")
    if train and train.get("dataset") == dataset:
        # Only the options this version knows: a recipe stored by an older spkprune may carry retired ones.
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        base = TrainConfig.from_dict({k: v for k, v in train.items() if k in known})
    else:
        base = TrainConfig.for_dataset(dataset)
    epochs = FINETUNE_EPOCHS if epochs is None else epochs
    if epochs < 0:
        raise SpkpruneError(f"--epochs must be >= 0, got {epochs}")
    changes = dict(
        epochs=max(epochs, 1),
        cooldown_epochs=0,
        warmup_epochs=min(FINETUNE_WARMUP_EPOCHS, max(epochs, 1)),
        lr=base.lr * FINETUNE_LR_FACTOR,
        mixup_off_epoch=None if base.mixup_off_epoch is None else min(base.mixup_off_epoch, max(epochs, 1)),
    )
    changes.update({k: v for k, v in overrides.items() if v is not None})
    return dataclasses.replace(base, **changes).validate()


def teacher_model(source: Checkpoint, teacher: Checkpoint | None = None) -> nn.Module:
    """The frozen teacher: `teacher` if given, else the source checkpoint with any token selector removed."""
    model = build_model(teacher if teacher is not None else source)
    return detach_selectors(model).eval().requires_grad_(False)


def select_tokens(
    source: Checkpoint,
    selection: SelectionConfig,
    *,
    epochs: int | None = None,
    teacher: Checkpoint | None = None,
    train_overrides: dict | None = None,
    progress: bool = True,
    train_data=None,
    test_data=None,
    device: str | torch.device | None = None,
) -> SelectionResult:
    """Attach selectors to `source`, fine-tune (unless `epochs == 0`) and evaluate teacher and student.

    The returned checkpoint holds the student's weights (with `token_selectors.*`), the source's masks unchanged, and
    `meta` with `selector`, `selection` (loss weights, teacher, teacher metrics, tokens per block), `train` and
    `metrics`; saving it (and its `parent`) is the caller's job.
    """
    epochs = check_budget(selection, epochs)
    cfg = finetune_config(source, epochs, **{"lr_scales": selection.lr_scales(), **(train_overrides or {})})
    seed_everything(cfg.seed)
    model = attach_selectors(detach_selectors(build_model(source)), selection.selector())
    teacher_net = teacher_model(source, teacher)
    timesteps = model.config.timesteps
    if test_data is None:
        test_data = get_dataset(cfg.dataset, "test", cfg.data_dir, timesteps=timesteps, img_size=model.config.img_size)
    if selection.scorer == "learned" and selection.init == "firing-rate":
        if train_data is None:
            train_data = get_dataset(cfg.dataset, "train", cfg.data_dir, timesteps=timesteps, augment=cfg.augment,
                                     img_size=model.config.img_size)
        warm_start_from_firing_rate(model, _first_images(train_data, WARM_START_SAMPLES))
    history: list[dict] = []
    if epochs > 0:
        loss = SelectionLoss(teacher_net, cfg.label_smoothing, selection.ratio_weight, selection.distill_weight)
        result = fit(
            model, cfg, masks=source.masks, hooks=TrainHooks(loss_fn=loss), progress=progress,
            train_data=train_data, test_data=test_data, device=device,
        )
        history = result.history
    seed_everything(cfg.seed)  # the random scorer's evaluation draws from torch's generator
    metrics = evaluate(model, test_data, cfg.eval_batch_size, record_firing=False, device=device, amp=cfg.amp)
    teacher_metrics = evaluate(teacher_net, test_data, cfg.eval_batch_size, record_firing=False, device=device,
                               amp=cfg.amp)
    checkpoint = _result_checkpoint(source, model, selection, cfg, metrics, teacher_metrics, teacher, epochs)
    return SelectionResult(checkpoint, model, metrics, teacher_metrics, tokens_per_block(model), history)


def check_budget(selection: SelectionConfig, epochs: int | None) -> int:
    """The fine-tuning epochs (default 10; 0 when skipping, which is training-free); one line when the scorer and
    the action cannot work with them."""
    skipping = selection.action == "skip"
    epochs = (0 if skipping else FINETUNE_EPOCHS) if epochs is None else epochs
    if skipping and (epochs > 0 or selection.scorer == "learned"):
        raise SpkpruneError(
            "--action skip is training-free (TP-Spikformer's early stopping): use --scorer firing-rate or random "
            "with --epochs 0 (the default), or --action drop to fine-tune"
        )
    if epochs == 0 and selection.scorer == "learned":
        raise SpkpruneError("a learned selector must be trained: pass --epochs 1 or more, or use --scorer firing-rate")
    return epochs


def _first_images(data, count: int) -> torch.Tensor:
    return torch.stack([data[i][0] for i in range(min(count, len(data)))])


def _result_checkpoint(source, model, selection, cfg, metrics, teacher_metrics, teacher, epochs) -> Checkpoint:
    counts = tokens_per_block(model)
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _check_masks_intact(state_dict, source.masks)
    meta = {
        key: source.meta[key] for key in ("arch", "config", "sparsity") if key in source.meta
    }
    meta.update(
        selector=selector_config(model),
        selection={
            **selection.to_dict(),
            "epochs": epochs,
            "teacher": teacher.ref if teacher is not None else source.ref,
            "teacher_metrics": _short(teacher_metrics),
            "tokens_per_block": counts,
        },
        train=cfg.to_dict(),
        seed=cfg.seed,
        metrics={**_short(metrics), "tokens_per_block": counts},
    )
    return Checkpoint(state_dict, dict(source.masks), meta)


def _short(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("top1", "top5", "loss", "samples") if k in metrics}


def _check_masks_intact(state_dict: dict, masks: dict) -> None:
    for key, mask in masks.items():
        if bool(state_dict[key][~mask.bool()].any()):
            raise RuntimeError(f"pruned weights of {key} are no longer zero after fine-tuning")  # a bug, not user error


def kept_summary(model: nn.Module) -> list[dict]:
    """One row per block: tokens it sees at inference and the fraction of the block's tokens without selectors."""
    counts, dense = tokens_per_block(model), dense_block_tokens(model)
    selectors = selectors_of(model)
    return [
        {
            "block": block,
            "selector": block in selectors,
            "keep_ratio": selectors[block].keep_ratio if block in selectors else None,
            "tokens": count,
            "fraction": count / dense[block],
        }
        for block, count in enumerate(counts)
    ]
