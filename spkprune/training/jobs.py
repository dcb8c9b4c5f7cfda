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
            if settings.arch or settings.init:
                raise SpkpruneError("--resume continues NAME as it was started; drop --arch and --init")
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


def run_evaluate(store: Store | None, settings: EvaluateSettings) -> dict:
    """Top-1, top-5, loss, firing rates (and tokens per block) of `settings.ref` on its data set's test split."""
    return evaluate_checkpoint(
        settings.ref, store.root if store is not None else None, dataset=settings.dataset,
        data_dir=settings.data_dir, batch_size=settings.batch_size, compile=settings.compile,
    )
