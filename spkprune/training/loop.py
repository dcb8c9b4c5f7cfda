"""`fit()`: the one training loop (AdamW, warm-up + cosine per iteration, label smoothing, mixup, AMP on CUDA, DDP
under torchrun, mask enforcement, hooks, exact resume)."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from spkprune.data import dataset_info, make_loader
from spkprune.errors import SpkpruneError
from spkprune.models.fastpath import prepare_for_training
from spkprune.training import distributed
from spkprune.training.amp import autocast
from spkprune.training.config import TrainConfig
from spkprune.training.datasets import train_test_splits
from spkprune.training.evaluate import evaluate
from spkprune.training.masking import MaskEnforcer
from spkprune.training.mixup import Mixup, soft_target_cross_entropy
from spkprune.training.progress import TrainProgress
from spkprune.training.schedule import WarmupCosine
from spkprune.training.state import (
    STATE_FORMAT,
    capture_rng,
    check_resumable,
    flatten_optimizer,
    restore_rng,
    seed_everything,
    unflatten_optimizer,
)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainHooks:
    """Extension points of `fit`.

    - `loss_fn(model, images, targets, logits) -> loss` replaces the loss. `targets` are class indices, or soft
      targets `[B, classes]` while mixup is active; `model` is the unwrapped module.
    - `on_step_end(state)` after every optimiser step (e.g. to keep the weights of iteration K for late rewinding).
    - `on_epoch_end(state)` after every epoch and its evaluation (e.g. to save a resumable checkpoint).
    """

    loss_fn: LossFn | None = None
    on_step_end: Callable[["TrainState"], None] | None = None
    on_epoch_end: Callable[["TrainState"], None] | None = None


@dataclass
class TrainState:
    """What hooks see. `epoch` counts finished epochs (1 after the first); `global_step` finished optimiser steps."""

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    scaler: torch.amp.GradScaler
    loader: DataLoader
    epoch: int = 0
    global_step: int = 0
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Optimiser, schedule, AMP scaler and RNG as (flat tensors, JSON-able dict); `fit(resume=...)` takes it back."""
        optim_tensors, optim_info = flatten_optimizer(self.optimizer)
        rng_tensors, rng_info = capture_rng(self.loader.generator)
        info = {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "optimizer": optim_info,
            "rng": rng_info,
            "history": self.history,
        }
        return {**optim_tensors, **rng_tensors}, info


@dataclass
class FitResult:
    metrics: dict
    history: list[dict]
    epochs: int
    global_step: int
    seconds: float


def parameter_groups(model: nn.Module, weight_decay: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """No weight decay on 1-D parameters (biases, norms) and on `model.no_weight_decay()` names (timm's rule); each
    group carries the `lr_scale` of the longest `lr_scales` prefix its parameters' names start with (1 otherwise)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple[bool, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        groups.setdefault((decays, _lr_scale(name, lr_scales)), []).append(param)
    groups.setdefault((True, 1.0), [])  # the two plain groups always exist (optimizer state layout)
    groups.setdefault((False, 1.0), [])
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, kv[0][1], not kv[0][0]))
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
        for (decays, scale), params in ordered
    ]


def _lr_scale(name: str, lr_scales: dict[str, float] | None) -> float:
    matches = [prefix for prefix in (lr_scales or {}) if name.startswith(prefix)]
    return float(lr_scales[max(matches, key=len)]) if matches else 1.0


class _Trainer:
    """Holds the objects of one run; `fit` below is the public entry point."""

    def __init__(self, model, cfg, train_data, test_data, masks, hooks, device, schedule_offset_iters):
        self.cfg = cfg
        self.hooks = hooks or TrainHooks()
        self.dist = distributed.current()
        self.device = torch.device(device) if device is not None else self.dist.device
        self.model = model.to(self.device)
        if hasattr(model, "neuron_sites"):  # lean neurons, fused BN + LIF, spikes kept as bool for backward
            prepare_for_training(model, compile=cfg.compile)
        self.train_data, self.test_data = train_test_splits(cfg, model, train_data, test_data)
        self.loader = make_loader(
            self.train_data, cfg.batch_size, train=True, seed=cfg.seed, num_workers=cfg.num_workers
        )
        if len(self.loader) == 0:
            raise SpkpruneError(
                f"batch size {cfg.batch_size} is larger than the training split ({len(self.train_data)} samples "
                f"per process); lower --batch-size"
            )
        self.optimizer = torch.optim.AdamW(
            parameter_groups(model, cfg.weight_decay, cfg.lr_scales), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8
        )
        self.iters = min(len(self.loader), cfg.limit_train_batches or len(self.loader))  # optimiser steps per epoch
        self.scheduler = WarmupCosine(
            self.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
            warmup_iters=cfg.warmup_epochs * self.iters, decay_iters=cfg.epochs * self.iters,
            offset=schedule_offset_iters,
        )
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.masks = MaskEnforcer(model, self.optimizer, masks or {})
        self.masks.apply()
        self.num_classes = dataset_info(cfg.dataset).num_classes
        self.net = self._wrap(model)
        self.state = TrainState(cfg, model, self.optimizer, self.scheduler, self.scaler, self.loader)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Some registered parameters (e.g. the original Spikformer's unused LayerNorms) never get a gradient.
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    def resume_from(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        check_resumable(info)
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, info["optimizer"]))
        self.scheduler.load_state_dict(info["scheduler"])
        if info["scaler"]:
            self.scaler.load_state_dict(info["scaler"])
        restore_rng(tensors, info["rng"], self.loader.generator)
        self.state.epoch, self.state.global_step = int(info["epoch"]), int(info["global_step"])
        self.state.history = list(info["history"])
        self.masks.apply()

    def _loss(self, images, targets, logits) -> torch.Tensor:
        if self.hooks.loss_fn is not None:
            return self.hooks.loss_fn(self.model, images, targets, logits)
        if targets.ndim == 2:
            return soft_target_cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.cfg.label_smoothing)

    def _mixup_for(self, epoch: int) -> Mixup | None:
        cfg = self.cfg
        if cfg.mixup_alpha <= 0 or (cfg.mixup_off_epoch is not None and epoch >= cfg.mixup_off_epoch):
            return None
        return Mixup(cfg.mixup_alpha, cfg.mixup_prob, cfg.label_smoothing, self.num_classes)

    def _step(self, images, targets, mixup) -> tuple[float, int, float]:
        labels = targets
        if mixup is not None:
            images, targets = mixup(images, targets)
        lr = self.scheduler.apply()
        with autocast(self.device, self.use_amp):
            logits = self.net(images)
            loss = self._loss(images, targets, logits)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.masks.mask_gradients()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.masks.apply()
        self.scheduler.step()
        self.state.global_step += 1
        if self.hooks.on_step_end is not None:
            self.hooks.on_step_end(self.state)
        correct = int(logits.detach().argmax(1).eq(labels).sum())
        return float(loss.detach()), correct, lr

    def train_epoch(self, epoch: int, progress: TrainProgress) -> dict:
        self.net.train()
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(epoch)
        mixup = self._mixup_for(epoch)
        progress.start_epoch(epoch + 1, self.iters)
        loss_sum, correct, seen, lr = 0.0, 0, 0, self.scheduler.lr_at(self.scheduler.step_count)
        start = time.perf_counter()
        for images, targets in itertools.islice(self.loader, self.iters):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss, hits, lr = self._step(images, targets, mixup)
            loss_sum, correct, seen = loss_sum + loss * len(targets), correct + hits, seen + len(targets)
            elapsed = time.perf_counter() - start
            progress.batch(loss_sum / seen, correct / seen, seen * self.dist.world_size / elapsed, lr)
        seconds = time.perf_counter() - start
        loss_sum, correct, seen = distributed.all_reduce_sum([loss_sum, correct, seen], self.device)
        distributed.average_buffers(self.model)
        return {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "images_per_s": seen / seconds,
            "seconds": seconds,
        }

    def evaluate(self) -> dict:
        return evaluate(
            self.model, self.test_data, self.cfg.eval_batch_size, record_firing=False, device=self.device,
            amp=self.cfg.amp,
        )

    def run(self, progress_enabled: bool) -> FitResult:
        cfg, state = self.cfg, self.state
        total = cfg.total_epochs
        progress = TrainProgress(progress_enabled and self.dist.is_main, total, state.epoch)
        start = time.perf_counter()
        final: dict = {}
        try:
            for epoch in range(state.epoch, total):
                metrics = self.train_epoch(epoch, progress)
                last = epoch + 1 == total
                if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                    final = self.evaluate()
                    metrics.update({k: final[k] for k in ("top1", "top5", "loss")})
                state.epoch, state.metrics = epoch + 1, metrics
                state.history.append(metrics)
                progress.end_epoch(metrics)
                if self.hooks.on_epoch_end is not None:
                    self.hooks.on_epoch_end(state)
        finally:
            progress.close()
        if not final:
            final = self.evaluate()
        return FitResult(final, state.history, state.epoch, state.global_step, time.perf_counter() - start)


def fit(
    model: nn.Module,
    cfg: TrainConfig,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    hooks: TrainHooks | None = None,
    resume: tuple[dict[str, torch.Tensor], dict] | None = None,
    progress: bool = True,
    start_epoch: int = 0,
    schedule_offset_iters: int = 0,
    train_data: Dataset | None = None,
    test_data: Dataset | None = None,
    device: torch.device | str | None = None,
) -> FitResult:
    """Train `model` in place for `cfg.total_epochs` epochs and evaluate it on the test split.

    - `masks` (parameter name -> bool, True = kept): pruned weights stay exactly zero.
    - `resume`: a `TrainState.state_tensors()` pair saved after some epoch; with the weights of that same epoch
      already loaded into `model`, the run continues and ends bit-identical to an uninterrupted one.
    - `start_epoch`: epochs already done (without a saved state); the schedule starts after them.
    - `schedule_offset_iters=K`: the learning-rate schedule starts at iteration K and its cosine ends with this
      run (late rewinding: retraining from the weights of iteration K continues the dense run's schedule).
    - `train_data` / `test_data` replace the data sets named by `cfg.dataset`.
    Under torchrun the model is wrapped in DistributedDataParallel and batches are split by a DistributedSampler.
    """
    cfg.validate()
    if resume is None:
        seed_everything(cfg.seed + distributed.current().rank)
    trainer = _Trainer(model, cfg, train_data, test_data, masks, hooks, device, schedule_offset_iters)
    if resume is not None:
        trainer.resume_from(*resume)
    elif start_epoch:
        trainer.state.epoch = start_epoch
        trainer.state.global_step = start_epoch * trainer.iters
        trainer.scheduler.step_count += trainer.state.global_step
    return trainer.run(progress)
