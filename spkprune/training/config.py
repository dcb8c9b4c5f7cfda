"""The training configuration: one flat dataclass, stored as JSON in every artifact it produced (`meta["train"]`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from spkprune.errors import SpkpruneError


@dataclass
class TrainConfig:
    """Everything that decides a training run (besides the model and its initial weights).

    The learning rate follows a per-iteration schedule: linear warm-up from `warmup_lr` to `lr` over
    `warmup_epochs`, then a cosine decay to `min_lr` at the end of `epochs`, then `cooldown_epochs` at `min_lr`
    (timm's convention: the run lasts `epochs + cooldown_epochs`).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 5
    cooldown_epochs: int = 0
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 5e-3
    min_lr: float = 1e-5
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    mixup_prob: float = 1.0
    mixup_off_epoch: int | None = None
    augment: bool = False
    seed: int = 0
    num_workers: int = 0
    amp: bool = True
    compile: bool = False  # the fused BatchNorm + LIF kernels through torch.compile (same results, see fused.py)
    timesteps: int | None = None
    grad_clip: float | None = None
    eval_every: int = 1
    limit_train_batches: int | None = None
    # Learning-rate multipliers by parameter-name prefix, e.g. {"token_selectors.": 10.0}: a parameter takes the
    # factor of the longest prefix its name starts with (1 otherwise), through warm-up and decay alike.
    lr_scales: dict[str, float] | None = None

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.cooldown_epochs

    def validate(self) -> "TrainConfig":
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.cooldown_epochs >= 0, "cooldown_epochs must be >= 0"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.lr > 0 and self.min_lr >= 0 and self.warmup_lr >= 0, "learning rates must be positive"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing must lie in [0, 1)"),
            (self.mixup_alpha >= 0 and 0 <= self.mixup_prob <= 1, "mixup_alpha >= 0 and mixup_prob in [0, 1]"),
            (self.timesteps is None or self.timesteps >= 1, "timesteps must be >= 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.limit_train_batches is None or self.limit_train_batches >= 1, "limit_train_batches must be >= 1"),
            (all(float(v) > 0 for v in (self.lr_scales or {}).values()), "lr_scales must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpkpruneError(f"invalid training configuration: {message}")
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
        from spkprune.data import dataset_info

        dataset_info(dataset)  # raises for an unknown name
        base = dict(_RECIPES.get(dataset, {}), dataset=dataset)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(base)


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
