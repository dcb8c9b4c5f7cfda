"""The settings of `spkprune train` and `spkprune evaluate`, declared once (see spkprune.settings)."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BeforeValidator

from spkprune.settings import NonNegativeInt, Settings, option, split_list
from spkprune.training.config import BatchSize, Epochs, LearningRate, TimeSteps

DATASETS = "digits (embedded), cifar10, cifar100, cifar10-dvs, dvs128-gesture or imagenet"
Steps = Annotated[tuple[Epochs, ...], BeforeValidator(split_list)]
DEFAULT_KEEP_EPOCHS = (1, 2, 3)


class TrainSettings(Settings):
    """`spkprune train`: train a preset on a data set, saving NAME, NAME@init and per-epoch checkpoints."""

    arch: Optional[str] = option(None, "Model preset, e.g. spikformer-2-64-digits (default: the data set's usual "
                                 "preset; in recipes: the recipe's `model`).")
    dataset: Optional[str] = option(None, f"Data set: {DATASETS} (default digits).")
    data_dir: Optional[str] = option(None, "Local data root (every data set but digits).")
    name: str = option(..., "Name of the run in the store: NAME, NAME@init, NAME@epoch-K.", identity=False)
    epochs: Optional[Epochs] = option(None, "Epochs of the cosine schedule (default: the data set's recipe); the "
                                      "recipe's cooldown epochs come on top.")
    cooldown_epochs: Optional[NonNegativeInt] = option(None, "Epochs at the minimum learning rate after the cosine "
                                                       "(CIFAR and DVS recipes: 10, digits: 0).")
    batch_size: Optional[BatchSize] = option(None, "Batch size per process.")
    lr: Optional[LearningRate] = option(None, "Peak learning rate of AdamW.")
    timesteps: Optional[TimeSteps] = option(None, "Override the preset's time steps T.")
    seed: Optional[int] = option(None, "Seed of initialisation, shuffling and augmentation.")
    init: Optional[str] = option(None, "Start from this checkpoint's weights (and masks) instead of a fresh "
                                 "initialisation.", ref=True)
    resume: bool = option(False, "Continue the run NAME from its last finished epoch.", recipe=None)
    keep_epochs: Steps = option(DEFAULT_KEEP_EPOCHS, "Epoch checkpoints kept for late rewinding, e.g. 1,2,3 (the "
                                "last one is always kept).", split=True)
    save_iter: Steps = option((), "Also save the weights after optimiser step K as NAME@iter-K (repeatable).",
                              repeat=True)
    limit_batches: Optional[BatchSize] = option(None, "Train on only this many batches per epoch (smoke tests).")
    workers: Optional[NonNegativeInt] = option(None, "DataLoader worker processes.", identity=False)
    threads: Optional[Annotated[int, BatchSize]] = option(None, "CPU threads per process for PyTorch (default: "
                                                          "PyTorch's; 1 is fastest for tiny models on a busy "
                                                          "machine).", identity=False)
    compile: bool = option(False, "Run the fused BatchNorm + LIF kernels through torch.compile (a few seconds per "
                           "layer shape on first use, cached on disk; faster steps on large models).", identity=False)

    def config_overrides(self) -> dict:
        """The TrainConfig fields these settings change (None: keep the data set's recipe)."""
        overrides = {
            "dataset": self.dataset, "data_dir": self.data_dir, "epochs": self.epochs,
            "cooldown_epochs": self.cooldown_epochs, "batch_size": self.batch_size, "lr": self.lr,
            "timesteps": self.timesteps, "seed": self.seed, "limit_train_batches": self.limit_batches,
            "num_workers": self.workers, "compile": self.compile or None,
        }
        return {key: value for key, value in overrides.items() if value is not None}


class EvaluateSettings(Settings):
    """`spkprune evaluate`: test accuracy, loss and the firing rate of every neuron site."""

    ref: str = option(..., "Checkpoint: NAME[@TAG], a .safetensors file, an exported folder or hf://ORG/REPO.",
                      argument=True, recipe="from", ref=True)
    dataset: Optional[str] = option(None, "Data set (default: the one the checkpoint was trained on).")
    data_dir: Optional[str] = option(None, "Local data root (default: the checkpoint's).")
    batch_size: BatchSize = option(256, "Evaluation batch size.", identity=False)
    compile: bool = option(False, "Fuse every neuron into one torch.compile kernel: same results, faster on large "
                           "models and data sets, about 10 s to compile first.", identity=False)
