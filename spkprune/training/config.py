"""The training configuration: one flat dataclass, stored as JSON in every artifact it produced (`meta["train"]`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Optional

from pydantic import Field, TypeAdapter, ValidationError

from spkprune.data import dataset_info
from spkprune.errors import SpkpruneError
from spkprune.settings import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, describe_error

# The bounds of the training quantities, shared by the full configuration and the commands' settings.
Epochs = PositiveInt
BatchSize = PositiveInt
LearningRate = PositiveFloat
TimeSteps = PositiveInt
Fraction = Annotated[float, Field(ge=0, le=1)]


@dataclass
class TrainConfig:
    """Everything that decides a training run (besides the model and its initial weights).

    The learning rate follows a per-iteration schedule: linear warm-up from `warmup_lr` to `lr` over
    `warmup_epochs`, then a cosine decay to `min_lr` at the end of `epochs`, then `cooldown_epochs` at `min_lr`
    (timm's convention: the run lasts `epochs + cooldown_epochs`).
    """

    dataset: str = "digits"
    data_dir: Optional[str] = None
    epochs: Epochs = 5
    cooldown_epochs: NonNegativeInt = 0
    batch_size: BatchSize = 32
    eval_batch_size: BatchSize = 256
    lr: LearningRate = 5e-3
    min_lr: NonNegativeFloat = 1e-5
    warmup_epochs: NonNegativeInt = 1
    warmup_lr: NonNegativeFloat = 1e-5
    weight_decay: float = 0.01
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    mixup_alpha: NonNegativeFloat = 0.0
    mixup_prob: Fraction = 1.0
    mixup_off_epoch: Optional[int] = None
    augment: bool = False
    seed: int = 0
    num_workers: NonNegativeInt = 0
    amp: bool = True
    compile: bool = False  # the fused BatchNorm + LIF kernels through torch.compile (same results, see fused.py)
    timesteps: Optional[TimeSteps] = None
    grad_clip: Optional[float] = None
    eval_every: int = 1
    limit_train_batches: Optional[BatchSize] = None
    # Learning-rate multipliers by parameter-name prefix, e.g. {"token_selectors.": 10.0}: a parameter takes the
    # factor of the longest prefix its name starts with (1 otherwise), through warm-up and decay alike.
    lr_scales: Optional[dict[str, LearningRate]] = None

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.cooldown_epochs

    def validate(self) -> "TrainConfig":
        """This configuration, or SpkpruneError naming the first field out of its bounds."""
        try:
            _ADAPTER.validate_python(dataclasses.asdict(self))
        except ValidationError as err:
            raise SpkpruneError(f"invalid training configuration: {describe_error(TrainConfig, err)}") from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpkpruneError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data).validate()

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes).validate()

    @classmethod
    def for_dataset(cls, dataset: str, **overrides) -> "TrainConfig":
        """The default recipe for `dataset`: tuned for digits, the original Spikformer scripts' settings otherwise."""
        dataset_info(dataset)  # raises for an unknown name
        base = dict(_RECIPES.get(dataset, {}), dataset=dataset)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(base)


_ADAPTER = TypeAdapter(TrainConfig)

# From SPIKFORMER.md section 6 (the original timm-based scripts).
_CIFAR = dict(
    epochs=300, cooldown_epochs=10, batch_size=128, eval_batch_size=128, lr=5e-4, min_lr=1e-5, warmup_epochs=20,
    warmup_lr=1e-5, weight_decay=0.06, label_smoothing=0.1, mixup_alpha=0.5, mixup_prob=1.0, mixup_off_epoch=200,
    seed=42, num_workers=4, augment=True,
)
_DVS = dict(
    epochs=96, cooldown_epochs=10, batch_size=16, eval_batch_size=16, lr=1e-3, min_lr=1e-5, warmup_epochs=10,
    warmup_lr=1e-5, weight_decay=0.06, label_smoothing=0.1, mixup_alpha=0.5, mixup_prob=0.5, mixup_off_epoch=75,
    seed=42, num_workers=4, timesteps=16, augment=True,
)
# imagenet.yml: batch 24 per GPU (8 GPUs), warm-up from 1e-6, wd 0.05, mixup 0.8 never switched off. The original
# also mixes in cutmix (alpha 1.0, switch prob 0.5), which spkprune's mixup does not implement.
_IMAGENET = dict(
    epochs=300, cooldown_epochs=10, batch_size=24, eval_batch_size=24, lr=5e-4, min_lr=1e-5, warmup_epochs=20,
    warmup_lr=1e-6, weight_decay=0.05, label_smoothing=0.1, mixup_alpha=0.8, mixup_prob=1.0, seed=42,
    num_workers=8, augment=True,
)
_RECIPES: dict[str, dict] = {
    "digits": {},
    "cifar10": _CIFAR,
    "cifar100": dict(_CIFAR, batch_size=64, eval_batch_size=64),
    "cifar10-dvs": _DVS,
    "dvs128-gesture": dict(_DVS, epochs=192),
    "imagenet": _IMAGENET,
}
