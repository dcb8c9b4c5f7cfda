"""Iterative magnitude pruning (the lottery-ticket procedure), after open_lth's `lottery/` levels.

What is pruned (`masks.py`: the strategy), how it trains (`spkprune.training.fit`) and the rounds (here) are separate.
Every round is a store artifact `NAME@round-K` (weights + masks + metadata); a finished round is never recomputed,
and an unfinished one continues from its last saved epoch (`NAME@round-K-epoch-E`, removed when the round ends):

    round 0   the given trained checkpoint (evaluated at full T; a pruned one keeps its masks)
    round k   prune `levels[k]` of the eligible weights by magnitude of round k-1's trained weights (or, with
              `granularity="channel"`, of the eligible heads / MLP channels / stem channels by importance),
              rewind the survivors (`init`, `epoch:K`, `iter:K`; `none` continues from round k-1's weights),
              retrain `epochs_per_round` epochs

One-shot pruning (`one_shot`) is the same loop with one round, straight to the target from the source's weights and
without rewinding or retraining: the pruned model's BatchNorm statistics are recalibrated on a few training batches
(`recalibrate_batches`), after an optional fine-tune of `finetune_epochs` epochs, and it is saved as `NAME@round-1`.

Controls (`random-reinit`: round k's masks on a fresh initialisation; `random-prune`: random masks with round k's
per-tensor counts on the rewind weights) are stored as `NAME@<control>-round-K` beside the ticket.

The pieces: `rewind.py` (the source and its rewind point), `granularity.py` (what a round prunes: weights, or
structures from `structures.py` / `structured.py`), `lottery.py` (the run's names, identity, masks and models),
`round_states.py` (resuming a round), `sharing.py` (one mask for every process), `report.py` (rows, plot).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from spkprune.data import get_dataset, make_loader
from spkprune.errors import SpkpruneError
from spkprune.pruning import masks as M
from spkprune.pruning.lottery import Log, Lottery
from spkprune.pruning.report import ImpReport, RoundRow, describe, plot_imp
from spkprune.pruning.rewind import load_source
from spkprune.pruning.settings import CONTROLS, ImpSettings
from spkprune.pruning.sharing import share_masks
from spkprune.store import Store, format_ref, parse_ref
from spkprune.training import MaskEnforcer, TrainConfig, TrainHooks, distributed, evaluate, fit
from spkprune.training.recalibrate import recalibrate_batchnorm

__all__ = [
    "CONTROLS", "ImpReport", "ImpSettings", "RoundRow", "describe", "plot_imp", "run_imp", "share_masks",
]


def run_imp(
    store: Store,
    ref: str,
    name: str,
    settings: ImpSettings,
    *,
    control: str = "none",
    resume: bool = False,
    progress: bool = True,
    plot: str | Path | None = None,
    log: Log = lambda message: None,
) -> ImpReport:
    """Find a lottery ticket of `ref` in `settings.rounds` rounds, saved as `name@round-0..N` (+ a control).

    Idempotent: finished rounds are read back, an unfinished round resumes from its last saved epoch, and a run that
    is complete does nothing (`report.nothing_to_do`). `resume=True` demands that `name` already holds this run.
    """
    lottery = _open(store, ref, name, settings, control, resume, progress, log)
    # A run killed after saving a round, before dropping that round's epoch states, left them behind.
    kinds = ["ticket"] + ([control] if control != "none" else [])
    for kind, k in [(kind, k) for kind in kinds for k in lottery.rounds(kind) if k > 0]:
        if lottery.done(kind, k):
            lottery.states(kind, k).drop()
    levels = lottery.pending(control)
    nothing_to_do = not levels and lottery.done("ticket", 0)
    _round_zero(lottery)
    for kind, level in levels:
        masks = lottery.masks(kind, level)  # prune
        model = lottery.rewound_model(kind, level)  # rewind
        metrics, cfg = _retrain(lottery, kind, level, model, masks)  # train (from the round's last saved epoch)
        lottery.save_round(kind, level, model, masks, metrics, cfg)  # save
    return _report(lottery, nothing_to_do, plot)


def _open(store, ref, name, settings, control, resume, progress, log) -> Lottery:
    """Check the request against the store and the source (SpkpruneError before anything is written)."""
    settings.validate()
    if control not in CONTROLS:
        raise SpkpruneError(f"unknown --control {control!r}; choose one of {', '.join(CONTROLS)}")
    parse_ref(format_ref(name, "round-0"))
    src = load_source(store, ref, settings)
    if settings.search_timesteps is not None and settings.search_timesteps > src.timesteps:
        raise SpkpruneError(
            f"--search-timesteps {settings.search_timesteps} exceeds the model's {src.timesteps} time steps"
        )
    lottery = Lottery(store, src, name, settings, progress, log)
    lottery.check_name_free_or_same()
    if resume and not store.exists(name, "round-0"):
        raise SpkpruneError(f"nothing to resume: the store holds no IMP run named {name!r}; drop --resume")
    distributed.barrier()  # every process decides what is pending from the same store state
    return lottery


def _round_zero(lottery: Lottery) -> None:
    """Round 0: the source itself, evaluated again at its full T."""
    if lottery.done("ticket", 0):
        return
    src = lottery.src
    model = src.model(src.ckpt.state_dict, src.timesteps)
    lottery.log(f"round 0: evaluating {src.art.ref}")
    lottery.save_round_zero(model, _test_metrics(model, src.train))


def _retrain(lottery: Lottery, kind: str, k: int, model: nn.Module, masks: M.Masks) -> tuple[dict, TrainConfig]:
    """Round k after pruning and rewinding: retrained (IMP; a one-shot run only with `finetune_epochs`), then, one-shot,
    its BatchNorm statistics recalibrated and the model evaluated; (test metrics, configuration)."""
    settings = lottery.settings
    if lottery.retrains:
        metrics, cfg = _train(lottery, kind, k, model, masks)
    else:
        cfg, metrics = lottery.src.train, None
        model.to(distributed.current().device)
        MaskEnforcer(model, None, masks).apply()
        lottery.log(f"{lottery.ref(kind, k)}: {lottery.pruning.summary(masks)}, T={lottery.timesteps(k)}, no retraining")
    if settings.one_shot and settings.recalibrate_batches:
        seen = recalibrate_batchnorm(model, _calibration_batches(model, cfg), settings.recalibrate_batches)
        lottery.log(f"{lottery.ref(kind, k)}: BatchNorm statistics recalibrated on {seen} training images")
        metrics = None
    return metrics if metrics is not None else _test_metrics(model, cfg), cfg


def _calibration_batches(model: nn.Module, cfg: TrainConfig) -> DataLoader:
    """Training images as the test split sees them (no augmentation), in a seeded order, the same on every process."""
    data = get_dataset(cfg.dataset, "train", cfg.data_dir, timesteps=model.config.timesteps, augment=False,
                       img_size=model.config.img_size)
    return make_loader(data, cfg.batch_size, train=True, seed=cfg.seed, distributed=False)


def _train(lottery: Lottery, kind: str, k: int, model: nn.Module, masks: M.Masks) -> tuple[dict, TrainConfig]:
    """Retrain round k under its masks, from the round's last saved epoch if any; (test metrics, configuration)."""
    cfg = lottery.round_config(k)
    states = lottery.states(kind, k)
    saved = states.latest(masks)
    if saved is not None:
        model.load_state_dict(saved.weights, strict=True)
    lottery.log(
        f"{lottery.ref(kind, k)}: {lottery.pruning.summary(masks)}, T={lottery.timesteps(k)}, "
        f"{cfg.total_epochs} epochs" + (f" (resuming after epoch {saved.epoch})" if saved else "")
    )
    parent = lottery.parent(kind, k)
    hooks = TrainHooks(on_epoch_end=lambda state: states.save(state, masks, parent))
    result = fit(
        model, cfg, masks=masks, hooks=hooks, resume=saved.resume if saved else None, progress=lottery.progress,
        schedule_offset_iters=lottery.rewind.offset_iters,
    )
    return result.metrics, cfg


def _test_metrics(model: nn.Module, cfg: TrainConfig) -> dict:
    data = get_dataset(cfg.dataset, "test", cfg.data_dir, timesteps=model.config.timesteps, augment=False,
                       img_size=model.config.img_size)
    return evaluate(model, data, cfg.eval_batch_size, record_firing=False, amp=cfg.amp)


def _report(lottery: Lottery, nothing_to_do: bool, plot: str | Path | None) -> ImpReport:
    """Every round in the store (ticket, then complete controls) and the plot, redrawn when something changed."""
    rows = [lottery.row(kind, k) for kind in lottery.present_kinds() for k in lottery.rounds(kind)]
    report = ImpReport(lottery.name, rows, nothing_to_do=nothing_to_do, settings=lottery.identity)
    target = Path(plot) if plot is not None else lottery.store.root / "plots" / f"{lottery.name}-imp.png"
    if distributed.is_main() and (not nothing_to_do or plot is not None or not target.exists()):
        report.plot = plot_imp(report, target)
    elif target.exists():
        report.plot = target
    return report
