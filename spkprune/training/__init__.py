"""Training and evaluation: `fit()` (the one training loop) and `evaluate()` (accuracy and firing rates)."""

from spkprune.training.config import TrainConfig
from spkprune.training.evaluate import FiringRecorder, evaluate
from spkprune.training.loop import FitResult, TrainHooks, TrainState, fit, parameter_groups
from spkprune.training.masking import MaskEnforcer
from spkprune.training.schedule import WarmupCosine

__all__ = [
    "FiringRecorder",
    "FitResult",
    "MaskEnforcer",
    "TrainConfig",
    "TrainHooks",
    "TrainState",
    "WarmupCosine",
    "evaluate",
    "fit",
    "parameter_groups",
]
