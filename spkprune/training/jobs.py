"""`spkprune train` and `spkprune evaluate` as library calls: settings in, result objects out."""

from __future__ import annotations

import torch

from spkprune.data import dataset_info
from spkprune.errors import SpkpruneError
from spkprune.store import Store
from spkprune.training import distributed
from spkprune.training.config import TrainConfig
from spkprune.training.runner import TrainOutcome, evaluate_checkpoint, resume_in_store, train_to_store
from spkprune.training.settings import EvaluateSettings, TrainSettings


def run_train(store: Store, settings: TrainSettings, *, progress: bool = True) -> TrainOutcome:
    """Train run `settings.name` into the store (or continue it with `resume`), under torchrun too."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    overrides = settings.config_overrides()
    info = distributed.init_distributed()
    try:
        if settings.resume:
            _check_same_origin(store, settings)
            return resume_in_store(store, settings.name, overrides=overrides, progress=progress and info.is_main)
        cfg = TrainConfig.for_dataset(overrides.pop("dataset", "digits"), **overrides)
        arch = settings.arch
        if arch is None and settings.init is None:
            arch = dataset_info(cfg.dataset).default_preset
        return train_to_store(
            store, settings.name, cfg, arch=arch, init=settings.init, keep_epochs=settings.keep_epochs,
            save_iters=settings.save_iter, progress=progress,
        )
    finally:
        distributed.shutdown()


def _check_same_origin(store: Store, settings: TrainSettings) -> None:
    """`--resume` with --arch / --init: allowed when they name what the run was started from, refused otherwise."""
    if settings.arch is None and settings.init is None:
        return
    started = store.get(settings.name, "init")
    if started is None:
        return  # nothing to resume: resume_in_store says so
    origin = {"--arch": started.meta.get("arch"), "--init": (started.meta.get("run") or {}).get("init")}
    given = {"--arch": settings.arch, "--init": settings.init}
    differ = [f"{flag} {value} (the run has {origin[flag]})" for flag, value in given.items()
              if value is not None and value != origin[flag]]
    if differ:
        raise SpkpruneError(f"--resume continues {settings.name} as it was started; these differ: {', '.join(differ)}")


def run_evaluate(store: Store | None, settings: EvaluateSettings) -> dict:
    """Top-1, top-5, loss, firing rates (and tokens per block) of `settings.ref` on its data set's test split."""
    return evaluate_checkpoint(
        settings.ref, store.root if store is not None else None, dataset=settings.dataset,
        data_dir=settings.data_dir, batch_size=settings.batch_size, compile=settings.compile,
    )
